"""`llmopt bench`: metric arithmetic by hand, the load generator against a fake
OpenAI server with injected delays and failures, output formats and the SLO gate."""

from __future__ import annotations

import asyncio
import csv
import io
import json

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from typer.testing import CliRunner

from llmopt.bench.loadgen import LoadSpec, RequestResult, Target, run_load, send
from llmopt.bench.metrics import SLO, percentile, summarize, tpot
from llmopt.bench.server_stats import ServerStats
from llmopt.bench.workloads import random_workload, shared_prefix_workload
from llmopt.cli.bench_serving import _with_prefixes
from llmopt.cli.main import app as cli
from llmopt.errors import UsageError
from tests.conftest import EXTRACTIVE
from tests.live_server import LiveServer

TTFT_S, ITL_S, TOKENS = 0.2, 0.05, 8
TEXT = "".join(f"t{i} " for i in range(TOKENS))  # what a stream of the fake server says


def sse(i: int | None) -> str:
    """Server-sent event: content chunk i, or (None) the usage chunk and [DONE]."""
    if i is not None:
        chunk = {"choices": [{"index": 0, "delta": {"content": f"t{i} "}}]}
        return f"data: {json.dumps(chunk)}\n\n"
    usage = {"prompt_tokens": 5, "completion_tokens": TOKENS, "total_tokens": 13}
    return f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n"


class InFlight:
    """Streams the fake server is sending at the moment, and the most at once."""

    def __init__(self) -> None:
        self.now = self.peak = 0

    def __enter__(self) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)

    def __exit__(self, *exc: object) -> None:
        self.now -= 1


IN_FLIGHT = InFlight()


def fake_app() -> FastAPI:
    """Streams TOKENS chunks: the first after TTFT_S, then one every ITL_S. The user
    message picks a behaviour: 'fail' answers 500, 'drop' cuts the stream."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        text = body["messages"][-1]["content"]
        if text == "fail":
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)

        async def events():
            with IN_FLIGHT:
                await asyncio.sleep(TTFT_S)
                for i in range(TOKENS):
                    if i:
                        await asyncio.sleep(ITL_S)
                    if text == "drop" and i == 3:
                        raise RuntimeError("connection dropped")  # uvicorn closes the socket
                    yield sse(i)
                yield sse(None)

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def fake():
    with LiveServer(fake_app()) as s:
        yield s


def result(ttft, itl, e2e, out, ok=True) -> RequestResult:
    return RequestResult(
        start=0,
        ok=ok,
        ttft=ttft,
        itl=itl,
        e2e=e2e,
        output_tokens=out,
        prompt_tokens=10,
        error=None if ok else "HTTP 500: x",
    )


def poll_server_stats(interval_s: float) -> dict[str, float]:
    """ServerStats over a fake server for 50 ms (its readings patched in by the test)."""

    async def run() -> dict[str, float]:
        stats = ServerStats(Target("http://127.0.0.1:9", None), interval_s=interval_s)
        stats.start()
        await asyncio.sleep(0.05)
        return await stats.stop()

    return asyncio.run(run())


def test_metric_math_by_hand() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([1, 2, 3, 4], 100) == 4 and percentile([7], 99) == 7
    assert percentile([10, 20, 30, 40, 50], 90) == pytest.approx(46)
    r1 = result(0.1, [0.02, 0.04], 0.16, 3)  # tpot = (0.16 - 0.1) / 2 = 0.03
    r2 = result(0.3, [0.05], 0.35, 2)  # tpot = 0.05
    bad = result(None, [], 0.0, 0, ok=False)
    assert tpot(r1) == pytest.approx(0.03)
    s = summarize(
        [r1, r2, bad], duration_s=2.0, percentiles=(50, 99), slo=SLO.parse("ttft=200,tpot=40")
    )
    assert s["completed"] == 2 and s["failed"] == 1
    assert s["failure_reasons"] == {"HTTP 500: x": 1}
    assert s["total_output_tokens"] == 5 and s["output_throughput"] == pytest.approx(2.5)
    assert s["total_token_throughput"] == pytest.approx((20 + 5) / 2)
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["mean_ttft_ms"] == pytest.approx(200) and s["median_ttft_ms"] == pytest.approx(200)
    assert s["p99_ttft_ms"] == pytest.approx(298)
    assert s["mean_tpot_ms"] == pytest.approx(40)
    assert s["mean_itl_ms"] == pytest.approx(110 / 3)  # pooled over requests
    assert s["mean_e2el_ms"] == pytest.approx(255)
    assert s["median_output_throughput_per_user"] == pytest.approx((3 / 0.16 + 2 / 0.35) / 2)
    # goodput: only r1 meets ttft <= 200 and tpot <= 40
    assert s["request_goodput"] == pytest.approx(0.5) and s["slo_met_fraction"] == pytest.approx(
        1 / 3
    )


def test_slo_parse_errors() -> None:
    for bad in ("ttft", "ttft=abc", "speed=5", "ttft=-1"):
        with pytest.raises(UsageError, match="bad --slo"):
            SLO.parse(bad)


def test_workloads_are_seeded_and_shaped() -> None:
    a = random_workload(4, 20, 8, 0.5, seed=1)
    assert [c.turns[0].content for c in a] == [
        c.turns[0].content for c in random_workload(4, 20, 8, 0.5, seed=1)
    ]
    assert all(10 <= len(c.turns[0].content.split()) <= 30 and c.ignore_eos for c in a)
    sp = shared_prefix_workload(2, 3, 50, 5, 8, seed=0)
    assert len(sp) == 6 and len({c.system for c in sp}) == 2
    assert sp[0].system != sp[1].system  # interleaved across prefixes


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_client_side_timings_are_read_on_the_clock() -> None:
    """send() times a stream on its clock: TTFT from the request to the first content
    chunk, a gap per later chunk, e2e to [DONE], start from the run's t0. The stream
    moves an injected clock on by TTFT_S before its first chunk, ITL_S before each next
    one and 0.01 before the usage: through httpx's MockTransport the client reads each
    chunk before the next is made, so every timing is exact arithmetic."""
    clock = Clock(100.0)

    async def events():
        for i in range(TOKENS):
            clock.now += TTFT_S if i == 0 else ITL_S
            yield sse(i).encode()
        clock.now += 0.01
        yield sse(None).encode()

    def answer(request: httpx.Request) -> httpx.Response:
        assert json.loads(request.content)["max_tokens"] == TOKENS
        return httpx.Response(200, content=events(), headers={"content-type": "text/event-stream"})

    async def main() -> RequestResult:
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            messages = [{"role": "user", "content": "hi"}]
            return await send(
                client, Target("http://fake", "m"), messages, TOKENS, True, 98.5, clock
            )

    r = asyncio.run(main())
    assert r.ok and r.text == TEXT
    assert r.start == pytest.approx(1.5)
    assert r.ttft == pytest.approx(TTFT_S)
    assert r.itl == pytest.approx([ITL_S] * (TOKENS - 1))
    assert r.e2e == pytest.approx(TTFT_S + (TOKENS - 1) * ITL_S + 0.01)
    assert r.output_tokens == TOKENS and r.prompt_tokens == 5


def test_fixed_concurrency_keeps_that_many_streams_in_flight(fake) -> None:
    """Six conversations at concurrency 3: the fake server sees three streams at once,
    never more, so the run takes two of them back to back at least (sleeps never end
    early; 1 ms for the two clocks' resolution)."""
    convs = random_workload(6, 4, TOKENS, 0.0, seed=0)
    IN_FLIGHT.peak = 0
    results, elapsed = asyncio.run(run_load(Target(fake.url, "m"), convs, LoadSpec(concurrency=3)))
    assert len(results) == 6 and all(r.ok for r in results)
    assert IN_FLIGHT.peak == 3
    one = TTFT_S + (TOKENS - 1) * ITL_S
    assert elapsed >= 2 * one - 1e-3
    for r in results:
        assert r.text == TEXT and len(r.itl) == TOKENS - 1
        assert r.output_tokens == TOKENS and r.prompt_tokens == 5
        assert r.ttft >= TTFT_S - 1e-3 and r.e2e >= one - 1e-3


def test_errors_and_dropped_connections_are_failures(fake) -> None:
    from llmopt.bench.workloads import Conversation, Turn

    convs = [Conversation([Turn(t, 8)]) for t in ("fail", "drop", "fine")]
    results, _ = asyncio.run(run_load(Target(fake.url, "m"), convs, LoadSpec()))
    assert len(results) == 3  # the run finished instead of raising
    fine = [r for r in results if r.ok]
    assert len(fine) == 1 and fine[0].text == TEXT and fine[0].output_tokens == TOKENS
    s = summarize(results, 1.0)
    assert s["completed"] == 1 and s["failed"] == 2
    reasons = sorted(r.error or "" for r in results if not r.ok)
    assert reasons[0] == "HTTP 500: boom"
    dropped = reasons[1]
    assert dropped.startswith("RemoteProtocolError") or "before [DONE]" in dropped, dropped
    assert s["failure_reasons"] == {reason: 1 for reason in reasons}
    # nobody listening: a connection error, counted
    dead, _ = asyncio.run(run_load(Target("http://127.0.0.1:9", "m"), convs[2:], LoadSpec()))
    assert not dead[0].ok and "ConnectError" in dead[0].error


def bench(*args: str):
    return CliRunner().invoke(cli, ["bench", *args])


def test_cli_formats_and_slo_exit_code(fake, tmp_path) -> None:
    common = ["--url", fake.url, "-n", "4", "-c", "2", "--output-len", "8", "--warmup", "0"]
    r = bench(*common, "--json")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    for field in (
        "mean_ttft_ms",
        "p99_itl_ms",
        "output_throughput",
        "median_tpot_ms",
        "p90_e2el_ms",
        "request_throughput",
        "completed",
        "failed",
    ):
        assert field in out
    assert out["completed"] == 4 and "time to first token" in r.stderr  # table on stderr

    r = bench(*common, "--csv")
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(rows) == 1 and float(rows[0]["mean_ttft_ms"]) > 100

    r = bench(
        *common,
        "--output",
        str(tmp_path / "r.json"),
        "--plot",
        str(tmp_path / "r.png"),
        "--sweep",
        "concurrency=1,2",
    )
    assert r.exit_code == 0, r.stderr
    runs = json.loads((tmp_path / "r.json").read_text())
    assert [x["name"] for x in runs] == ["llmopt concurrency=1", "llmopt concurrency=2"]
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"

    assert bench(*common, "--slo", "ttft=5000").exit_code == 0
    missed = bench(*common, "--slo", "ttft=50")
    assert missed.exit_code == 1 and "SLO missed" in missed.stderr


def test_cli_refuses_bad_options(fake) -> None:
    for args, message in (
        (["--concurrency", "0"], "--concurrency"),
        (["--sweep", "speed=1"], "--sweep"),
        (["--workload", "nope"], "--workload"),
        (["--workload", "chat"], "--dataset"),
        (["--percentiles", "x"], "--percentiles"),
        (["--warm-prefixes"], "system prompts"),  # random prompts have none to warm
        (["--device", "cpu"], "--device"),  # a running server's device is its own
        (["--speculative", "ngram"], "--speculative"),  # and so is its speculation
    ):
        r = bench("--url", fake.url, *args)
        assert r.exit_code == 2 and message in r.stderr, (args, r.stderr)


def test_warm_prefixes_sends_each_system_prompt_once_with_other_questions() -> None:
    measured = shared_prefix_workload(2, 3, 50, 8, 4, seed=0)
    pool = shared_prefix_workload(2, 3, 50, 8, 4, seed=1)
    warm = _with_prefixes(measured, pool)
    assert [c.system for c in warm] == [measured[0].system, measured[1].system]
    asked = {c.turns[0].content for c in measured}
    assert all(c.turns[0].content not in asked for c in warm)  # only the prefix is shared


@pytest.mark.real_model
def test_local_model_compare_starts_llmopt_serve_per_configuration(smollm_folder, tmp_path) -> None:
    """One `llmopt serve` per configuration, with bench's own engine flags
    (--num-speculative-tokens here) and the configuration's; the server's /metrics
    give the figures that only it knows: its speculation's acceptance rate and mean
    accepted length (at most 1 + 2 with 2 tokens a round) where it ran."""
    data = tmp_path / "extractive.jsonl"
    rows = [EXTRACTIVE, EXTRACTIVE.replace("river bank", "old mill")]
    data.write_text(
        "".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n" for q in rows)
    )
    r = bench(
        str(smollm_folder),
        "--workload", "chat", "--dataset", str(data), "--output-len", "24", "-c", "2",
        "--warmup", "0", "--compare", "speculative=off,ngram", "--num-speculative-tokens", "2",
        "--no-speculative-adaptive",
        "--serve-arg=--kv-cache-memory=0.1", "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    started = " ".join(r.stderr.split())
    assert "--num-speculative-tokens=2 --no-speculative-adaptive --speculative ngram" in started
    off, on = json.loads(r.stdout)
    assert [off["name"], on["name"]] == ["speculative=off", "speculative=ngram"]
    assert all(x["completed"] == 2 and x["failed"] == 0 for x in (off, on))
    assert on["total_output_tokens"] == off["total_output_tokens"]  # greedy: the same answers
    assert "server_peak_kv_blocks_used_fraction" in off  # read from our /metrics
    assert not any(k.startswith("server_spec") for k in off)
    drafted, accepted = on["server_spec_draft_tokens"], on["server_spec_accepted_tokens"]
    assert 0 < accepted <= drafted
    assert on["server_spec_acceptance_rate"] == round(accepted / drafted, 4)
    assert 1 < on["server_spec_mean_accepted_length"] <= 3
    assert "server_spec_acceptance_rate" in r.stderr  # a row of the table
    assert bench(str(smollm_folder), "--compare", "colour=red").exit_code == 2


def test_compare_configurations_map_to_serve_flags() -> None:
    """The stack's last layer adds prompt-lookup speculation to the prefix cache's
    configuration; each axis value becomes `llmopt serve` flags."""
    from llmopt.cli.bench_serving import _configs

    stack = _configs("stack")
    assert [name for name, _ in stack][-2:] == ["+ prefix cache", "+ speculative (ngram)"]
    assert stack[-1][1] == [*stack[-2][1], "--speculative", "ngram"]
    assert _configs("speculative=off,ngram") == [
        ("speculative=off", ["--speculative", "off"]),
        ("speculative=ngram", ["--speculative", "ngram"]),
    ]
    assert _configs("kv-cache-dtype=fp32,int8") == [
        ("kv-cache-dtype=fp32", ["--kv-cache-dtype", "fp32"]),
        ("kv-cache-dtype=int8", ["--kv-cache-dtype", "int8"]),
    ]
    assert _configs("prefix-cache=on,off") == [
        ("prefix-cache=on", ["--prefix-cache"]),
        ("prefix-cache=off", ["--no-prefix-cache"]),
    ]


def test_chat_file_and_multi_turn_workloads(fake, tmp_path) -> None:
    from llmopt.bench.workloads import chat_file_workload, multi_turn_workload

    data = tmp_path / "chats.jsonl"
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"Question {i}?"},
            ]
        }
        for i in range(3)
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    convs = chat_file_workload(data, output_len=8, limit=None)
    assert len(convs) == 3 and convs[0].history == rows[0]["messages"][:1]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "assistant", "content": "x"}]}\n')
    with pytest.raises(UsageError, match=r"bad\.jsonl:1"):
        chat_file_workload(bad, 8, None)

    turns = multi_turn_workload(2, turns=3, input_len=4, output_len=TOKENS, seed=0)
    results, _ = asyncio.run(run_load(Target(fake.url, "m"), turns, LoadSpec(concurrency=2)))
    assert len(results) == 6 and all(r.ok for r in results)  # every turn of both
    r = bench(
        "--url", fake.url, "--workload", "chat", "--dataset", str(data), "--warmup", "0", "--json"
    )
    assert r.exit_code == 0 and json.loads(r.stdout)["completed"] == 3


def test_server_stats_before_the_engine_has_stepped(monkeypatch: pytest.MonkeyPatch) -> None:
    """An llmopt server whose engine never stepped (every request refused) reports 0
    KV blocks in all: the summary says 0% used instead of dividing by zero."""
    from llmopt.bench.server_stats import ServerStats

    zeros = {
        name: 0.0
        for name in (
            "llmopt_kv_blocks_total", "llmopt_kv_blocks_used", "llmopt_requests_running",
            "llmopt_requests_waiting", "llmopt_prefix_cache_hit_tokens_total",
            "llmopt_prefix_cache_miss_tokens_total",
        )
    }  # fmt: skip

    async def read(self: ServerStats, client: httpx.AsyncClient) -> dict[str, float]:
        return dict(zeros)

    monkeypatch.setattr(ServerStats, "_read", read)

    summary = poll_server_stats(interval_s=0.01)
    assert summary["server_peak_kv_blocks_used_fraction"] == 0.0
    assert summary["server_prefix_cache_hit_rate"] == 0.0
    assert not any(k.startswith("server_spec") for k in summary)  # no speculation ran


def test_server_stats_speculation_from_the_counters_across_the_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The run's acceptance rate and mean accepted length come from what the server's
    counters grew by during it (what they held before is another run's)."""
    from llmopt.bench.server_stats import ServerStats

    def reading(rounds: float, drafted: float, accepted: float) -> dict[str, float]:
        return {
            "llmopt_kv_blocks_total": 8.0, "llmopt_kv_blocks_used": 0.0,
            "llmopt_requests_running": 0.0, "llmopt_requests_waiting": 0.0,
            "llmopt_prefix_cache_hit_tokens_total": 0.0,
            "llmopt_prefix_cache_miss_tokens_total": 0.0,
            "llmopt_spec_decode_num_drafts_total": rounds,
            "llmopt_spec_decode_num_draft_tokens_total": drafted,
            "llmopt_spec_decode_num_accepted_tokens_total": accepted,
        }  # fmt: skip

    readings = iter([reading(10, 40, 36), reading(14, 56, 46)])

    async def read(self: ServerStats, client: httpx.AsyncClient) -> dict[str, float]:
        return next(readings)

    monkeypatch.setattr(ServerStats, "_read", read)

    summary = poll_server_stats(interval_s=60)  # one poll: the first reading
    # This run: 4 rounds drafted 16 tokens, 10 accepted.
    assert summary["server_spec_draft_tokens"] == 16
    assert summary["server_spec_accepted_tokens"] == 10
    assert summary["server_spec_acceptance_rate"] == 0.625
    assert summary["server_spec_mean_accepted_length"] == 3.5
