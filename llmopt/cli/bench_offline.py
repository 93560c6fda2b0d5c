"""`llmopt bench MODEL --offline`: the in-process engine without HTTP, llama-bench
style (see llmopt/bench/offline.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from llmopt.cli.common import emit_json, format_spec
from llmopt.engine.config import EngineConfig
from llmopt.errors import UsageError


@dataclass(frozen=True)
class OfflineOptions:
    pp: int  # prompt tokens to process
    tg: int  # tokens to generate
    batch: int  # sequences for batch tg
    repeats: int
    seed: int
    depth: int  # context tokens before tg (llama-bench's -d)
    as_json: bool
    output: Path | None


def run_offline(engine: EngineConfig, o: OfflineOptions, console: Console) -> None:
    import torch
    from rich.table import Table

    from llmopt.bench.offline import offline_bench
    from llmopt.bench.setup import machine_info
    from llmopt.engine.factory import open_engine

    if min(o.pp, o.tg, o.batch, o.repeats) < 1 or o.depth < 0:
        raise UsageError("--pp, --tg, --batch and --repeats must be at least 1, --depth 0 or more")
    # Every repetition does the same work: no prefix cache; a prompt in one chunk.
    config = engine.replace(
        max_num_seqs=o.batch, max_num_batched_tokens=max(o.pp, 512), prefix_cache=False
    )
    name, gen, loaded = open_engine(config, console)
    dtype_name = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    cache = {"kv_cache": gen.kv_cache_description, "kv_cache_tokens": gen.kv_capacity_tokens}
    measured = offline_bench(gen, o.pp, o.tg, o.batch, o.repeats, o.seed, o.depth)
    result = (
        {"model": name, "dtype": dtype_name}
        | cache
        | measured.rates
        | measured.spec.spec_dict()
        | machine_info(torch.get_num_threads(), gen.runner.device)
    )
    t = Table("test", "tokens/s", header_style="bold")
    for key, v in result.items():
        if isinstance(v, dict):
            t.add_row(key.removesuffix("_tokens_per_s"), f"{v['mean']:.2f} ± {v['std']:.2f}")
    console.print(t)
    if measured.spec.spec_rounds:
        console.print(format_spec(measured.spec), highlight=False)
    emit_json(result, o.as_json, o.output)
