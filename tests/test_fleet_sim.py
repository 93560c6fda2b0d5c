"""The fleet simulator on a small fleet: every request completes in order of its
events, the calibration reads bench output, and the policies rank as they should."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmopt.errors import UsageError
from llmopt.router.policies import make_policy
from llmopt.router.sim.calibration import Calibration
from llmopt.router.sim.fleet import FleetSpec, simulate
from llmopt.router.sim.report import figures, markdown
from llmopt.router.sim.workload import Workload

DEFAULT = Path(__file__).resolve().parent.parent / "scripts" / "fleet_calibration.json"
CAL = Calibration.load([DEFAULT])


def test_calibration_step_times_and_bench_override(tmp_path: Path) -> None:
    assert CAL.step_s(1) == pytest.approx(1 / 270)
    assert CAL.step_s(64) == pytest.approx(64 / 1356)
    assert CAL.step_s(1) < CAL.step_s(6) < CAL.step_s(8) and CAL.max_batch == 64
    bench = {
        "pp512_tokens_per_s": {"mean": 2000.0, "std": 1},
        "tg128_tokens_per_s": {"mean": 300.0, "std": 1},
        "batch8_tg128_tokens_per_s": {"mean": 1000.0, "std": 1},
    }
    (tmp_path / "b.json").write_text(json.dumps(bench))
    cal = Calibration.load([DEFAULT, tmp_path / "b.json"])
    assert cal.prefill_tokens_per_s == 2000 and cal.step_s(8) == pytest.approx(8 / 1000)
    assert cal.step_s(64) == CAL.step_s(64)
    with pytest.raises(UsageError, match="full calibration"):
        Calibration.load([tmp_path / "b.json"])


@pytest.mark.parametrize(
    "policy", ["round-robin", "least-connections", "model-aware", "prefix-aware"]
)
def test_every_request_completes(policy: str) -> None:
    spec = FleetSpec(replicas=8, model_slots=2)
    jobs = simulate(make_policy(policy), CAL, Workload(models=4), spec, 0.8, 2.0, seed=1)
    assert len(jobs) > 20
    assert all(j.request.arrival <= j.first_token <= j.end for j in jobs)
    assert all(j.route.tokens > j.request.output_tokens for j in jobs)
    assert "| 80% |" in markdown([figures(policy, 0.8, jobs)])


def run(policy: str, w: Workload, replicas: int = 16, load: float = 0.9):
    jobs = simulate(make_policy(policy), CAL, w, FleetSpec(replicas=replicas), load, 10.0, 3)
    return figures(policy, load, jobs)


def test_least_connections_beats_round_robin_on_skewed_lengths() -> None:
    w = Workload(models=1, output_sigma=1.5, shared_prefix_share=0.0)
    rr, lc = run("round-robin", w), run("least-connections", w)
    assert lc.ttft_p99 < rr.ttft_p99 and lc.requests == rr.requests


def test_model_aware_saves_cold_starts_and_prefix_aware_hits() -> None:
    w = Workload(models=6)
    rr, ma = run("round-robin", w), run("model-aware", w)
    assert ma.cold_starts * 4 <= rr.cold_starts
    lc, pa = run("least-connections", Workload(models=1)), run("prefix-aware", Workload(models=1))
    assert pa.prefix_hit_rate > 1.5 * lc.prefix_hit_rate
