"""How tensor and pipeline parallelism scale with the interconnect, on paper: decode time
per step for a 7B and a 70B Llama from the communication llmopt's split does per token
(the volumes scripts/parallel_bench.py measures: TP two all-reduces of hidden values per
layer, PP one (x, residual) pair per stage boundary) and stated link constants.

  python scripts/parallel_scaling.py [--batch 1] [--hbm-gbs 3350]

Model of a decode step with B sequences:
- compute: every weight byte read once from HBM, split over the ranks
  (weights / ranks / HBM bandwidth); memory-bound decode, so FLOPs are ignored.
- TP over N ranks, Megatron's: ring all-reduce of B x hidden x 2 bytes, twice a layer:
  2 (N - 1) latency + 2 (N - 1) / N x bytes / bandwidth each. The exact split: four
  ring all-gathers a layer of B x (query width, hidden, MLP width, hidden) x 2 bytes,
  (N - 1) latency + (N - 1) / N x bytes / bandwidth each.
- PP over S stages: a step's tokens cross S - 1 boundaries in sequence, each a send of
  B x 2 x hidden x 2 bytes (latency + bytes / bandwidth); the stages' compute does not
  overlap within one step of decode (the next token needs this one), so a step costs
  the whole model's compute plus the sends: PP buys memory and throughput across
  micro-batches, not one sequence's latency.
"""

from __future__ import annotations

import argparse

# (hidden, layers, weight bytes in bf16, query width, MLP width)
MODELS = {
    "Llama-2-7B": (4096, 32, 13.5e9, 4096, 11008),
    "Llama-2-70B": (8192, 80, 138e9, 8192, 28672),
}
# Per direction bandwidth (bytes/s) and a collective step's latency (s): assumptions from
# public figures (NVLink 4 on H100 SXM; PCIe 4.0 x16; 10 GbE with TCP), not measured here.
LINKS = {"NVLink 4": (450e9, 3e-6), "PCIe 4.0 x16": (25e9, 10e-6), "10 GbE": (1.25e9, 50e-6)}
BYTES = 2  # bf16 activations


def tp_step(
    hidden: int, layers: int, weights: float, n: int, batch: int, link, hbm: float
) -> float:
    bw, lat = link
    compute = weights / n / hbm
    if n == 1:
        return compute
    size = batch * hidden * BYTES
    per_reduce = 2 * (n - 1) * lat + 2 * (n - 1) / n * size / bw
    return compute + 2 * layers * per_reduce


def exact_tp_step(
    hidden: int, layers: int, weights: float, q: int, mlp: int, n: int, batch: int, link, hbm
) -> float:
    """The exact split: four ring all-gathers a layer (attention's output, o_proj's,
    the MLP's activation, down_proj's), each (N - 1) steps."""
    bw, lat = link
    compute = weights / n / hbm
    if n == 1:
        return compute
    widths = q + hidden + mlp + hidden
    per_layer = 4 * (n - 1) * lat + (n - 1) / n * batch * widths * BYTES / bw
    return compute + layers * per_layer


def pp_step(hidden: int, weights: float, s: int, batch: int, link, hbm: float) -> float:
    bw, lat = link
    return weights / hbm + (s - 1) * (lat + batch * 2 * hidden * BYTES / bw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--hbm-gbs", type=float, default=3350.0, help="GB/s per device (H100 SXM)")
    args = parser.parse_args()
    hbm = args.hbm_gbs * 1e9
    print(f"decode step, batch {args.batch}, ms (speed-up over 1 device where it fits)")
    print("| model | link | TP=1 | TP=2 | TP=4 | TP=8 | PP=2 | PP=4 | all-reduce bytes/token |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (hidden, layers, weights, _, _) in MODELS.items():
        per_token = 2 * layers * hidden * BYTES
        for link_name, link in LINKS.items():
            base = tp_step(hidden, layers, weights, 1, args.batch, link, hbm)
            cells = []
            for n in (1, 2, 4, 8):
                t = tp_step(hidden, layers, weights, n, args.batch, link, hbm)
                fits = weights / n < 80e9
                cells.append(
                    f"{t * 1e3:.2f} ({base / t:.2f}x)" if fits else f"{t * 1e3:.2f} (no fit)"
                )
            for s in (2, 4):
                t = pp_step(hidden, weights, s, args.batch, link, hbm)
                cells.append(f"{t * 1e3:.2f}")
            print(f"| {name} | {link_name} | {' | '.join(cells)} | {per_token / 1e3:.0f} KB |")
    print("\nthe exact split (llmopt's default), ms (speed-up over 1 device)")
    print("| model | link | TP=2 | TP=4 | TP=8 |")
    print("|---|---|---|---|---|")
    for name, (hidden, layers, weights, q, mlp) in MODELS.items():
        for link_name, link in LINKS.items():
            base = tp_step(hidden, layers, weights, 1, args.batch, link, hbm)
            cells = []
            for n in (2, 4, 8):
                t = exact_tp_step(hidden, layers, weights, q, mlp, n, args.batch, link, hbm)
                cells.append(f"{t * 1e3:.2f} ({base / t:.2f}x)")
            print(f"| {name} | {link_name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
