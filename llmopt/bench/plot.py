"""`--plot FILE.png`: latency distributions per run, and for several runs (a sweep or
a comparison) throughput and latency side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmopt.errors import UsageError
from llmopt.loader.atomic import atomic_file


def plot_runs(
    runs: list[tuple[str, dict[str, Any]]], percentiles: tuple[float, ...], path: Path
) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'llmopt[bench]'") from None
    names = [n for n, _ in runs]
    stats = ["mean", "median", *(f"p{p:g}" for p in percentiles if p != 50)]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax_tp, ax_ttft, ax_tpot = axes
    x = range(len(runs))
    ax_tp.bar(x, [r["output_throughput"] for _, r in runs], color="tab:blue")
    ax_tp.set_title("output throughput (tokens/s)")
    width = 0.8 / len(stats)
    for ax, metric, title in (
        (ax_ttft, "ttft", "time to first token (ms)"),
        (ax_tpot, "tpot", "time per output token (ms)"),
    ):
        for i, stat in enumerate(stats):
            ax.bar(
                [j + i * width for j in x],
                [r[f"{stat}_{metric}_ms"] for _, r in runs],
                width,
                label=stat,
            )
        ax.set_title(title)
        ax.legend(fontsize=8)
    for ax in axes:
        ax.set_xticks([j + 0.4 - 0.4 / len(stats) if ax is not ax_tp else j for j in x])
        ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
