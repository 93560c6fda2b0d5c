"""The Ray Serve request router's core (llmopt/cluster/routing.py), without Ray: it
ranks first what the policy class itself chooses for the same states, counts requests
started and finished as the router does, applies each replica's stats report once,
and forgets a replica that left. And `llmopt cluster`'s refusals, before any Ray."""

from __future__ import annotations

import importlib.util
import socket
import sys

import pytest
from typer.testing import CliRunner

from llmopt.cli.main import app
from llmopt.cluster.routing import PolicyRouting
from llmopt.cluster.spec import ClusterConfig, ReplicaSpec, served_name
from llmopt.engine.config import EngineConfig
from llmopt.errors import UsageError
from llmopt.router.policies import make_policy
from llmopt.router.prefix_index import PrefixIndex
from llmopt.router.request_view import RequestView, route_for
from llmopt.router.state import ReplicaState

TWO_MODELS = {
    "r1": {"report": 1, "models": ["a", "b"], "loaded": ["a"], "max_loaded": 1},
    "r2": {"report": 1, "models": ["a", "b"], "loaded": ["b"], "max_loaded": 1},
}


def view(model: str | None, prompt: str = "hello") -> RequestView:
    return RequestView(model, prompt, 10)


def test_model_aware_ranks_the_replica_holding_the_model_first() -> None:
    routing = PolicyRouting("model-aware")
    routing.update(TWO_MODELS)
    assert routing.rank("q1", view("b"), ["r1", "r2"]) == [["r2"], ["r1"]]
    assert routing.rank("q2", view("a"), ["r1", "r2"]) == [["r1"], ["r2"]]
    # The same choice as the policy class on states built by hand.
    states = [
        ReplicaState("r1", frozenset("ab"), ["a"], 1),
        ReplicaState("r2", frozenset("ab"), ["b"], 1),
    ]
    route, _ = route_for(view("b"), PrefixIndex())
    assert make_policy("model-aware").choose(route, states).name == "r2"


def test_started_and_finished_count_in_flight_and_cold_starts() -> None:
    routing = PolicyRouting("model-aware")
    routing.update(TWO_MODELS)
    routing.rank("q1", view("b"), ["r1", "r2"])
    routing.started("q1", "r1")  # Ray sent it elsewhere (r2 was full): r1 loads b
    r1 = routing.states["r1"]
    assert r1.in_flight == 1 and r1.loaded == ["b"]
    text = routing.metrics.render().decode()
    assert 'llmopt_router_cold_starts_total{policy="model-aware",replica="r1"} 1.0' in text
    routing.update(TWO_MODELS)  # the same report again: the counts made since stay
    assert r1.loaded == ["b"]
    routing.finished("q1", "r2")  # an attempt elsewhere (refused there): not this one
    assert r1.in_flight == 1
    routing.finished("q1", "r1")
    assert r1.in_flight == 0 and r1.outstanding_tokens == 0
    routing.update({**TWO_MODELS, "r1": {**TWO_MODELS["r1"], "report": 2}})  # the next one
    assert r1.loaded == ["a"]  # what the replica says now holds


def test_prefix_aware_sends_a_repeated_prefix_where_it_went() -> None:
    routing = PolicyRouting("prefix-aware")
    routing.update({"r1": {}, "r2": {}})  # no stats yet: every replica serves anything
    long = "You are a helpful assistant. " * 8
    routing.rank("q1", view("m", long + "first question"), ["r1", "r2"])
    routing.started("q1", "r2")
    routing.finished("q1", "r2")
    assert routing.rank("q2", view("m", long + "second question"), ["r1", "r2"])[0] == ["r2"]
    assert routing.rank("q3", view("m", "unrelated"), ["r1", "r2"])[0] == ["r1"]  # least loaded
    routing.update({"r1": {}})  # r2 left: its prefixes are forgotten
    assert routing.rank("q4", view("m", long + "third"), ["r1"]) == [["r1"]]
    assert routing.index.size("r2") == 0


def test_round_robin_takes_turns_and_a_request_is_routed_once() -> None:
    routing = PolicyRouting("round-robin")
    routing.update({"r1": {}, "r2": {}})
    firsts = [routing.rank(f"q{i}", view(None), ["r1", "r2"])[0][0] for i in range(4)]
    assert sorted(firsts) == ["r1", "r1", "r2", "r2"] and firsts[0] != firsts[1]
    route = routing.route("q9", view("m", "abc"))
    assert routing.route("q9", view("m", "other")) is route  # ranked again: the same route


def test_unknown_policy_and_bad_sizes_are_refused() -> None:
    spec = ReplicaSpec(("smollm2-135m-instruct",), EngineConfig())
    with pytest.raises(UsageError, match="unknown policy 'fastest'"):
        ClusterConfig(spec, policy="fastest")
    with pytest.raises(UsageError, match="--replicas must be at least 1"):
        ClusterConfig(spec, replicas=0)
    with pytest.raises(UsageError, match="given twice"):
        ReplicaSpec(("a", "a"), EngineConfig())
    assert ClusterConfig(spec, replica_cpus=0.5).threads == 1
    assert served_name("smollm2-135m-instruct") == "smollm2-135m-instruct"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--replicas", "0"], "error: --replicas must be at least 1, not 0\n"),
        (["--policy", "fastest"], "error: unknown policy 'fastest'; choose one of: "),
        (["--replica-cpus", "-1"], "error: --replica-cpus must be positive, not -1\n"),
        (["--model", "no-such-model"], "error: unknown model 'no-such-model': not in the "),
    ],
)
def test_cluster_cli_refuses_bad_flags_in_one_line(args: list[str], message: str) -> None:
    r = CliRunner().invoke(app, ["cluster", "smollm2-135m-instruct", *args])
    assert r.exit_code == 2 and r.stderr.startswith(message) and r.stderr.count("\n") == 1


def test_cluster_cli_without_ray_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if not installed
    r = CliRunner().invoke(app, ["cluster", "smollm2-135m-instruct"])
    assert r.exit_code == 2
    assert (
        r.stderr
        == "error: Ray Serve is not installed; install it with: pip install 'llmopt[cluster]'\n"
    )


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs Ray installed")
def test_cluster_cli_fails_fast_where_no_ray_cluster_answers() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    r = CliRunner().invoke(app, ["cluster", "smollm2-135m-instruct", "--address", address])
    assert r.exit_code == 1
    assert r.stderr == (
        f"error: no Ray cluster answers at 127.0.0.1:{port} (start one there with "
        "`ray start --head`)\n"
    )
