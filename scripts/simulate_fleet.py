"""Simulate a fleet of llmopt replicas behind each routing policy (llmopt/router/sim/).

Prints a markdown table of P50/P99 TTFT and end-to-end latency, throughput, cold starts
and prefix hits per load and policy, and writes a plot (with matplotlib).

    python scripts/simulate_fleet.py                      # 1,000 replicas, 20 models
    python scripts/simulate_fleet.py --replicas 8 --duration 2
    python scripts/simulate_fleet.py --calibration my-bench-b32.json   # llmopt bench
        MODEL --offline --batch 32 --json > my-bench-b32.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from llmopt.router.policies import POLICIES, make_policy
from llmopt.router.sim.calibration import Calibration
from llmopt.router.sim.fleet import FleetSpec, simulate
from llmopt.router.sim.report import figures, markdown, plot
from llmopt.router.sim.workload import Workload

DEFAULT_CALIBRATION = Path(__file__).with_name("fleet_calibration.json")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--replicas", type=int, default=1000)
    p.add_argument("--models", type=int, default=20)
    p.add_argument("--model-slots", type=int, default=4, help="models a replica holds at once")
    p.add_argument("--shared-prefix-share", type=float, default=0.8)
    p.add_argument("--loads", default="0.5,0.8,0.95", help="comma-separated, of capacity")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--calibration",
        type=Path,
        action="append",
        default=[],
        help="overrides (repeatable): a calibration file or bench --offline --json",
    )
    p.add_argument("--plot", type=Path, default=Path("fleet_simulation.png"))
    a = p.parse_args()
    cal = Calibration.load([DEFAULT_CALIBRATION, *a.calibration])
    w = Workload(models=a.models, shared_prefix_share=a.shared_prefix_share)
    spec = FleetSpec(replicas=a.replicas, model_slots=a.model_slots)
    print(f"calibration: {cal.source}", file=sys.stderr)
    rows = []
    for load in (float(x) for x in a.loads.split(",")):
        for name in a.policies.split(","):
            t = time.perf_counter()
            jobs = simulate(make_policy(name), cal, w, spec, load, a.duration, a.seed)
            rows.append(figures(name, load, jobs))
            print(
                f"{name} at {load:.0%}: {len(jobs):,} requests in {time.perf_counter() - t:.1f} s",
                file=sys.stderr,
            )
    print(markdown(rows))
    if plot(rows, a.plot):
        print(f"plot: {a.plot}", file=sys.stderr)
    else:
        print("no plot: matplotlib is not installed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
