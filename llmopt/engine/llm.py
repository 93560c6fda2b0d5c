"""Building an engine for a model, and the offline batch API:

from llmopt import LLM, SamplingParams
llm = LLM("smollm2-135m-instruct")
for out in llm.generate(["Hello", "Bonjour"], SamplingParams(temperature=0)):
    print(out.text)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from llmopt.device import resolve_device, resolve_dtype
from llmopt.engine.engine import Engine
from llmopt.engine.outputs import RequestStats
from llmopt.engine.runner import Runner, kv_dtype_for
from llmopt.engine.sampling_params import SamplingParams
from llmopt.engine.scheduler import SchedulerConfig
from llmopt.errors import UsageError
from llmopt.layers.attention_backend import PagedKVCache
from llmopt.loader.load import LoadedModel, load_model, runs_quantized
from llmopt.store.resolve import resolve
from llmopt.store.store import Store

BLOCK_SIZE = 16
CPU_MEMORY_FRACTION = 0.1  # of available RAM, when --kv-cache-memory is not given
GPU_MEMORY_FRACTION = 0.5  # of free GPU memory after the weights


def default_kv_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * GPU_MEMORY_FRACTION)
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(available * CPU_MEMORY_FRACTION)


def build_engine(
    loaded: LoadedModel,
    max_context: int | None = None,
    kv_cache_memory: float | None = None,  # GB
    scheduler_config: SchedulerConfig | None = None,
    block_size: int = BLOCK_SIZE,
    prefix_cache: bool = True,
) -> Engine:
    cfg = loaded.config
    context = min(cfg.max_position_embeddings, max_context or cfg.max_position_embeddings)
    p = next(loaded.model.parameters())
    per_token = PagedKVCache.bytes_per_token(
        cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, kv_dtype_for(p.dtype, p.device)
    )
    budget = kv_cache_memory * 1e9 if kv_cache_memory is not None else default_kv_memory(p.device)
    num_blocks = int(budget // (per_token * block_size))
    if num_blocks < 2:
        raise UsageError(
            f"--kv-cache-memory {budget / 1e9:.3f} GB holds under two blocks of "
            f"{block_size} tokens ({per_token} bytes a token); give it more"
        )
    runner = Runner(loaded.model, num_blocks, block_size)
    return Engine(runner, loaded.tokenizer, loaded.eos_ids, context, scheduler_config, prefix_cache)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: RequestStats


class LLM:
    """A model loaded once, generating for many prompts at a time with continuous batching."""

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_context: int | None = None,
        kv_cache_memory: float | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 1024,
        batching: str = "continuous",  # or "dynamic" / "static", to compare policies
        prefix_cache: bool = True,
        dequantize: bool = False,  # a GGUF file's weights dense (see load_model)
    ) -> None:
        console = Console(stderr=True)
        store = Store()
        self.name, path = resolve(str(model) if model else None, store, console)
        dev = resolve_device(device)
        quantized = runs_quantized(path, dev, store, console, dequantize)
        dt = resolve_dtype(dtype, dev, batched=True, quantized=quantized)
        self.loaded = load_model(path, dt, dev, store, console, dequantize)
        self.engine = build_engine(
            self.loaded,
            max_context,
            kv_cache_memory,
            SchedulerConfig(max_num_seqs, max_num_batched_tokens, batching),
            prefix_cache=prefix_cache,
        )

    def encode(self, prompt: str | list[int], chat: bool) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        tok = self.loaded.tokenizer
        if chat:
            return tok.encode_chat([{"role": "user", "content": prompt}])
        return tok.encode(prompt)

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        params: SamplingParams | None = None,
        chat: bool = False,
    ) -> list[Completion]:
        """Generate for every prompt (text, or token ids) at once; results in prompt order.
        chat=True wraps each text prompt as a user message in the model's chat template."""
        if isinstance(prompts, str):
            prompts = [prompts]
        params = params or SamplingParams()
        engine = self.engine
        ids = [engine.add_request(self.encode(p, chat), params) for p in prompts]
        texts: dict[str, list[str]] = {rid: [] for rid in ids}
        tokens: dict[str, list[int]] = {rid: [] for rid in ids}
        results: dict[str, Completion] = {}
        while engine.has_unfinished():
            for rid in engine.step():
                for d in engine.take(rid):
                    texts[rid].append(d.text)
                    tokens[rid] += d.token_ids
                    if d.finish_reason is not None:
                        assert d.stats is not None
                        results[rid] = Completion(
                            "".join(texts[rid]), tokens[rid], d.finish_reason, d.stats
                        )
        return [results[rid] for rid in ids]
