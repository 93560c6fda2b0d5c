"""Batch invariance on the packed path: a request's greedy output does not depend on
what shares its steps. The real SmolLM2 Q4_1 file runs as stored (int kernels, fp32
activations); each prompt alone, on an engine of its own, must give exactly the tokens
it gets inside batches of every shape: one large step of many prompts, small prefill
chunks, preemption and recompute, prefix-cache hits."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console

from llmopt.engine.config import EngineConfig
from llmopt.engine.engine import Engine
from llmopt.engine.factory import build_engine
from llmopt.engine.sampling_params import SamplingParams
from llmopt.loader.load import LoadedModel, load_model
from llmopt.models.native_decode import NativeDecoder
from llmopt.store.store import Store
from tests.conftest import REAL_HOME, require_kernel, run_to_completion, spy_preemptions

TOPICS = [
    "the tides", "a violin", "bread", "glaciers", "owls", "the printing press", "saffron",
    "volcanoes", "chess openings", "coral reefs", "the abacus", "lighthouses", "silk",
    "comets", "honeybees", "the Silk Road",
]  # fmt: skip
GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
BYTES_PER_KV_BLOCK = 16 * 46080  # SmolLM2: 16 tokens of 30 layers x 3 heads x 64, fp32 K and V


@pytest.fixture(scope="module")
def packed(smollm_gguf) -> LoadedModel:
    from llmopt.kernels import qgemv

    require_kernel(qgemv.load())
    return load_model(smollm_gguf, torch.float32, torch.device("cpu"), Store(REAL_HOME), Console())


def prompts(loaded: LoadedModel, system: str | None = None) -> list[list[int]]:
    head = [{"role": "system", "content": system}] if system else []
    return [
        loaded.tokenizer.encode_chat([*head, {"role": "user", "content": f"Tell me about {t}."}])
        for t in TOPICS
    ]


def run(engine: Engine, batch: list[list[int]]) -> list[list[int]]:
    out = run_to_completion(engine, batch, GREEDY)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    return out


def alone(
    loaded: LoadedModel, batch: list[list[int]], kv: str = "auto", params=GREEDY
) -> list[list[int]]:
    config = EngineConfig(
        max_context=2048, kv_cache_memory=0.05, prefix_cache=False, kv_cache_dtype=kv
    )
    return [run_to_completion(build_engine(loaded, config), [p], params)[0] for p in batch]


def test_the_packed_path_runs_natively(packed) -> None:
    linears = {type(m).__name__ for m in packed.model.modules() if hasattr(m, "kernel")}
    assert linears == {"QuantLinear"}
    engine = build_engine(packed, EngineConfig(max_context=2048, kv_cache_memory=0.05))
    assert isinstance(engine.runner.model.native_decode, NativeDecoder)
    assert engine.runner.model.native_decode.max_rows >= len(TOPICS)


@pytest.mark.parametrize("kv", ["auto", "int8"])  # an int8 cache: a scale per token
def test_one_large_batch_equals_each_alone(packed, kv) -> None:
    batch = prompts(packed)
    config = EngineConfig(max_context=2048, kv_cache_memory=0.1, kv_cache_dtype=kv)
    assert run(build_engine(packed, config), batch) == alone(packed, batch, kv)


def test_small_chunks_preemption_and_prefix_hits_equal_each_alone(packed) -> None:
    # The chat template's system part is shared: cached blocks are hit. Eight blocks of
    # KV for up to eight sequences force preemption; 24-token steps cut the prompts.
    batch = prompts(packed, "Answer briefly.")
    config = EngineConfig(
        max_context=2048,
        kv_cache_memory=8 * BYTES_PER_KV_BLOCK / 1e9,
        max_num_seqs=8,
        max_num_batched_tokens=24,
    )
    engine = build_engine(packed, config)
    preempted = spy_preemptions(engine)
    assert run(engine, batch[:8]) == alone(packed, batch[:8])
    assert preempted and engine.blocks.hit_tokens > 0


def test_tokens_recomputed_after_preemption_equal_each_alone(packed) -> None:
    """Preempted after generating, a sequence runs its prompt and its generated tokens
    again: the generated ones must come back with the decode arithmetic they were made
    with (run as prefill rows, 3 of these 6 prompts changed their text within 48
    tokens)."""
    batch = prompts(packed)[:6]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    config = EngineConfig(
        max_context=2048, kv_cache_memory=6 * BYTES_PER_KV_BLOCK / 1e9, prefix_cache=False
    )
    engine = build_engine(packed, config)
    generated: list[int] = []  # each preempted sequence's output tokens at the time
    schedule = engine.scheduler.schedule

    def spy():
        step = schedule()
        generated.extend(seq.num_output_tokens for seq in step.preempted)
        return step

    engine.scheduler.schedule = spy
    assert run_to_completion(engine, batch, params) == alone(packed, batch, params=params)
    assert max(generated) > 8  # generated tokens were recomputed


def test_sequences_behind_a_long_shared_prompt_equal_each_alone(packed) -> None:
    """A system prompt of over 256 tokens, shared through the prefix cache: decode
    attends to its keys once for the whole group of sequences behind it, with the
    arithmetic each sequence has alone."""
    from pydoc_data.topics import topics

    system = "Answer using this reference. " + " ".join((topics["while"] + topics["for"]).split())
    batch = prompts(packed, system)[:6]
    assert len(batch[0]) > 300
    config = EngineConfig(max_context=2048, kv_cache_memory=0.1)
    assert run(build_engine(packed, config), batch) == alone(packed, batch)
