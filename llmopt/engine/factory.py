"""From an EngineConfig to a loaded model, and to an engine over it: each step (resolve
the name, open the source, choose the dtype, load, size the KV cache) done once, here,
for every surface (`LLM`, `run`, `serve`'s engine process, `bench`, perplexity)."""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from rich.console import Console

from llmopt.device import resolve_device, resolve_dtype
from llmopt.distributed.group import DRIVER
from llmopt.distributed.shard import Shard
from llmopt.distributed.stage import Stage
from llmopt.distributed.steps import Peers
from llmopt.engine import parallel
from llmopt.engine.config import EngineConfig
from llmopt.engine.engine import Engine
from llmopt.engine.runner import Runner
from llmopt.engine.spec.draft_model import DraftModelDrafter
from llmopt.engine.spec.drafter import Drafter
from llmopt.engine.spec.ngram import NgramDrafter
from llmopt.errors import UsageError
from llmopt.layers.kv_cache import PagedKVCache
from llmopt.layers.kv_types import resolve_kv_types
from llmopt.loader.load import LoadedModel, ModelSource, load_model, open_source
from llmopt.store.resolve import resolve
from llmopt.store.store import Store

CPU_MEMORY_FRACTION = 0.1  # of available RAM, when kv_cache_memory is not given
GPU_MEMORY_FRACTION = 0.5  # of free GPU memory after the weights


class Loaded(NamedTuple):
    name: str  # the registry name, or the file or folder name
    model: LoadedModel


def load(
    config: EngineConfig, console: Console | None = None, part: Shard | Stage | None = None
) -> Loaded:
    """Resolve config.model, open it, choose the dtype and load it on the device
    (with config.threads applied to torch); with `part`, a rank's part of it."""
    console = console or Console(stderr=True)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    name, source = _open(config, console)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device, config.batched, source.runs_quantized)
    return Loaded(name, load_model(source, dtype, device, part=part))


def _open(config: EngineConfig, console: Console) -> tuple[str, ModelSource]:
    """config.model resolved and opened: its name and its source."""
    store = Store()
    name, path = resolve(config.model, store, console)
    device = resolve_device(config.device)
    return name, open_source(path, device, store, console, config.dequantize)


def default_kv_memory(device: torch.device) -> int:
    """Bytes for the KV cache when the config does not say."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * GPU_MEMORY_FRACTION)
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(available * CPU_MEMORY_FRACTION)


def build_engine(
    loaded: LoadedModel,
    config: EngineConfig,
    console: Console | None = None,
    peers: Peers | None = None,
) -> Engine:
    """An engine over a loaded model, its KV cache sized from the config (per rank,
    with `peers`: the other ranks of a tensor-parallel model, `loaded` the driver's
    shard)."""
    cfg = loaded.model.config  # the shard's: its KV heads are what the cache holds
    context = min(cfg.max_position_embeddings, config.max_context or cfg.max_position_embeddings)
    p = next(loaded.model.parameters())
    k_type, v_type = resolve_kv_types(config.kv_types, p.dtype, p.device)
    per_token = PagedKVCache.bytes_per_token(
        cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, k_type, v_type
    )
    gb = config.kv_cache_memory
    budget = gb * 1e9 if gb is not None else default_kv_memory(p.device)
    num_blocks = int(budget // (per_token * config.block_size))
    if num_blocks < 2:
        raise UsageError(
            f"--kv-cache-memory {budget / 1e9:.3f} GB holds under two blocks of "
            f"{config.block_size} tokens ({per_token} bytes a token); give it more"
        )
    runner = Runner(loaded.model, num_blocks, config.block_size, config.kv_types, peers=peers)
    drafter = make_drafter(config, loaded, num_blocks, console)
    return Engine(runner, loaded.tokenizer, loaded.eos_ids, context, config, drafter)


def make_drafter(
    config: EngineConfig, target: LoadedModel, num_blocks: int, console: Console | None
) -> Drafter | None:
    """The drafter that config.speculation names (None: speculation off). A draft
    model's cache holds as many tokens as the target's."""
    if config.speculation == "ngram":
        return NgramDrafter()
    if config.speculation != "draft":
        return None
    # The draft runs as it is stored (a GGUF's blocks packed), whatever the target does.
    draft_config = config.replace(
        model=config.draft, speculative="off", draft=None, dequantize=False, dtype="auto"
    )
    _, draft = load(draft_config, console)
    if not draft.tokenizer.same_vocabulary(target.tokenizer):
        raise UsageError(
            f"the draft model {config.draft} has another vocabulary than the target: "
            "a draft must share the target's tokenizer"
        )
    runner = Runner(draft.model, num_blocks, config.block_size, config.kv_types)
    context = min(draft.config.max_position_embeddings, config.max_context or 1 << 30)
    return DraftModelDrafter(runner, context, config.prefix_cache)


class Opened(NamedTuple):
    name: str
    engine: Engine
    loaded: LoadedModel


def open_engine(config: EngineConfig, console: Console | None = None) -> Opened:
    """The model of config.model, loaded, in an engine built from the config.

    With --tensor-parallel-size or --pipeline-parallel-size N, this process is the
    driver (rank 0): it starts the other N - 1 ranks on this machine (or joins
    torchrun's) and loads its own part. A rank other than the driver (under torchrun,
    or started by a driver) serves the driver's steps until it is told to stop, and
    then exits (engine/parallel.py)."""
    if config.ranks == 1:
        name, loaded = load(config, console)
        return Opened(name, build_engine(loaded, config, console), loaded)
    if resolve_device(config.device).type != "cpu":
        raise UsageError("a model split over ranks runs on the CPU (gloo) in this version")
    if not parallel.is_worker():  # a split the model cannot take, refused before any start
        _, source = _open(config, console or Console(stderr=True))
        parallel.part_of(config, DRIVER).check(source.config)
    name, loaded, peers = parallel.open_part(config, load, console)
    return Opened(name, build_engine(loaded, config, console, peers), loaded)
