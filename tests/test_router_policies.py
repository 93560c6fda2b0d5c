"""The routing policies' choices on constructed replica states, the prefix index, and
the policy registry (no server involved)."""

from __future__ import annotations

import pytest

from llmopt.errors import UsageError
from llmopt.router.policies import POLICIES, make_policy
from llmopt.router.prefix_index import PrefixIndex
from llmopt.router.state import ReplicaState, RouteRequest


def replicas(*in_flight: int, **kw) -> list[ReplicaState]:
    return [ReplicaState(str(i), in_flight=n, **kw) for i, n in enumerate(in_flight)]


def request(index: PrefixIndex, text: str, model: str | None = "m") -> RouteRequest:
    return RouteRequest(model, 10, index.match(index.keys(text)))


def test_registry_names_the_valid_policies() -> None:
    assert set(POLICIES) == {"round-robin", "least-connections", "model-aware", "prefix-aware"}
    with pytest.raises(UsageError, match="round-robin, least-connections"):
        make_policy("random")


def test_round_robin_takes_turns_blind_to_load() -> None:
    rs, p, idx = replicas(9, 0, 0), make_policy("round-robin"), PrefixIndex()
    picks = [p.choose(request(idx, "x"), rs).name for _ in range(6)]
    assert sorted(picks) == ["0", "0", "1", "1", "2", "2"]


def test_least_connections_then_fewest_outstanding_tokens() -> None:
    rs = replicas(3, 1, 1)
    rs[1].outstanding_tokens, rs[2].outstanding_tokens = 500, 20
    assert make_policy("least-connections").choose(request(PrefixIndex(), "x"), rs) is rs[2]


def test_model_aware_prefers_loaded_then_room_then_spills() -> None:
    rs = replicas(5, 0, 1, max_loaded=2)
    rs[0].loaded, rs[1].loaded, rs[2].loaded = ["m"], ["a", "b"], ["a"]
    p, idx = make_policy("model-aware", spill_at=8), PrefixIndex()
    assert p.choose(request(idx, "x"), rs) is rs[0]  # warm, though busier
    rs[0].in_flight = 8  # at the spill bound: load it where there is room
    assert p.choose(request(idx, "x"), rs) is rs[2]
    assert rs[2].start(request(idx, "x"))  # a cold start, counted by the state
    assert not rs[2].start(request(idx, "x")) and rs[2].loaded == ["a", "m"]


def test_state_evicts_the_least_recently_used_model() -> None:
    r = ReplicaState("0", loaded=["a", "b"], max_loaded=2)
    idx = PrefixIndex()
    assert not r.start(request(idx, "x", "a"))  # a is now the most recent
    assert r.start(request(idx, "x", "c")) and r.loaded == ["a", "c"]
    assert r.in_flight == 2 and r.outstanding_tokens == 20


def test_prefix_aware_follows_the_longest_match_unless_imbalanced() -> None:
    idx = PrefixIndex(chunk_chars=4)
    system = "You are a helpful assistant. " * 4
    idx.insert(idx.keys(system + "first question"), "1")
    idx.insert(idx.keys(system[:8]), "2")
    rs = replicas(0, 2, 0)
    p = make_policy("prefix-aware", min_match=0.5, balance_abs=4, balance_rel=1.5)
    assert p.choose(request(idx, system + "second"), rs) is rs[1]
    assert p.choose(request(idx, "unrelated text " * 8), rs) is rs[0]  # no match: least loaded
    rs[1].in_flight = 7  # 7 - 0 > 4 and 7 > 1.5 * 0: too busy
    assert p.choose(request(idx, system + "second"), rs) is rs[0]


def test_prefix_index_matches_evicts_leaves_first_and_forgets() -> None:
    idx = PrefixIndex(chunk_chars=2, capacity=4)
    idx.insert(idx.keys("aabbccdd"), "r")
    m = idx.match(idx.keys("aabbxx"))
    assert m.depth("r") == 2 and m.chunks == 3 and m.depth("other") == 0
    idx.insert(idx.keys("aabbee"), "r")  # 5 nodes > 4: the oldest leaf (dd) goes
    assert idx.size("r") == 4 and idx.match(idx.keys("aabbccdd")).depth("r") == 3
    idx.forget("r")
    assert idx.size("r") == 0 and not idx.holders
