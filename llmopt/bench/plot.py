"""`--plot FILE.png`: throughput, time to first token and time per output token
(mean, median and the percentiles) for each run: bars per configuration, or lines
against the swept value (concurrency, request rate) for a sweep."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmopt.atomic import atomic_file
from llmopt.errors import UsageError

PANELS = [("ttft", "time to first token (ms)"), ("tpot", "time per output token (ms)")]


def plot_runs(
    runs: list[tuple[str, dict[str, Any]]],
    percentiles: tuple[float, ...],
    path: Path,
    sweep: tuple[str, list[float]] | None = None,  # (what was swept, its value per run)
) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'llmopt[bench]'") from None
    stats = ["mean", "median", *(f"p{p:g}" for p in percentiles if p != 50)]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    throughput = [r["output_throughput"] for _, r in runs]
    if sweep is not None:
        key, xs = sweep
        axes[0].plot(xs, throughput, marker="o")
        for ax, (metric, _) in zip(axes[1:], PANELS, strict=True):
            for stat in stats:
                ax.plot(xs, [r[f"{stat}_{metric}_ms"] for _, r in runs], marker="o", label=stat)
        for ax in axes:
            ax.set_xlabel(key)
    else:
        x = list(range(len(runs)))
        width = 0.8 / len(stats)
        axes[0].bar(x, throughput, color="tab:blue")
        for ax, (metric, _) in zip(axes[1:], PANELS, strict=True):
            for i, stat in enumerate(stats):
                values = [r[f"{stat}_{metric}_ms"] for _, r in runs]
                ax.bar([j + i * width for j in x], values, width, label=stat)
        for i, ax in enumerate(axes):
            ax.set_xticks([j + (0 if i == 0 else 0.4 - width / 2) for j in x])
            ax.set_xticklabels([n for n, _ in runs], rotation=20, ha="right", fontsize=8)
    axes[0].set_title("output throughput (tokens/s)")
    for ax, (_, title) in zip(axes[1:], PANELS, strict=True):
        ax.set_title(title)
        ax.legend(fontsize=8)
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
