"""Our decoder against transformers' reference implementation on the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from llmopt.engine.config import EngineConfig
from llmopt.engine.engine import Engine
from llmopt.engine.factory import build_engine
from llmopt.engine.sampling_params import SamplingParams
from llmopt.errors import ModelFormatError
from llmopt.layers.kv_cache import PagedKVCache
from llmopt.layers.kv_types import resolve_kv_types
from llmopt.loader.load import LoadedModel, load_model
from llmopt.models.registry import hf_architecture_for_gguf
from llmopt.models.scoring import Scorer
from llmopt.store.store import Store
from tests.conftest import TEST_DEVICE, write_tiny_model


def ours(folder: Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    return load_model(folder, dtype, TEST_DEVICE, Store(), Console(stderr=True))


def reference(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def engine_for(loaded: LoadedModel, **settings) -> Engine:
    return build_engine(loaded, EngineConfig(max_context=4096, kv_cache_memory=0.05, **settings))


def full_logits(loaded: LoadedModel, ids: list[int]) -> torch.Tensor:
    """Logits at every position from our model in one prefill: (T, V), on the CPU."""
    return Scorer(loaded.model, len(ids)).logits(ids).cpu()


def greedy_ids(loaded: LoadedModel, ids: list[int], n: int, **scheduler) -> list[int]:
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return [t for d in engine_for(loaded, **scheduler).generate(ids, params) for t in d.token_ids]


@pytest.fixture(scope="module")
def smollm(smollm_folder: Path) -> tuple[LoadedModel, object]:
    return ours(smollm_folder), reference(smollm_folder)


def chat_ids(loaded: LoadedModel, text: str) -> list[int]:
    return loaded.tokenizer.encode_chat([{"role": "user", "content": text}])


def test_smollm_logits_match_transformers(smollm) -> None:
    mine, ref = smollm
    ids = chat_ids(mine, "Explain briefly why the sky is blue.")
    with torch.inference_mode():
        expected = ref(torch.tensor([ids])).logits[0].float()
    got = full_logits(mine, ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 2e-3


def test_smollm_64_greedy_tokens_match_transformers(smollm) -> None:
    mine, ref = smollm
    ids = chat_ids(mine, "Write a short poem about the sea.")
    with torch.inference_mode():
        out = ref.generate(
            torch.tensor([ids]), max_new_tokens=64, min_new_tokens=64, do_sample=False
        )
    expected = out[0, len(ids) :].tolist()
    assert greedy_ids(mine, ids, 64) == expected


def test_chunked_prefill_and_decode_match_one_prefill(smollm) -> None:
    # Prefill in chunks of 7 tokens through the paged cache, then decode: the same
    # greedy tokens as one whole prefill.
    mine, _ = smollm
    ids = chat_ids(mine, "A longer question about the history of the printing press. " * 4)
    assert greedy_ids(mine, ids, 16, max_num_batched_tokens=7) == greedy_ids(mine, ids, 16)


def test_bf16_answers_the_capital_question(smollm_folder) -> None:
    loaded = ours(smollm_folder, torch.bfloat16)
    engine = engine_for(loaded)
    ids = chat_ids(loaded, "What is the capital of France?")
    text = "".join(d.text for d in engine.generate(ids, SamplingParams(temperature=0)))
    assert "Paris" in text


@pytest.mark.parametrize(
    "arch,overrides",
    [
        ("llama", {}),
        ("llama", {"tie_word_embeddings": True, "head_dim": 32}),
        ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
        (
            "llama",
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                }
            },
        ),
        (
            "llama",
            {
                "rope_scaling": {
                    "rope_type": "yarn",
                    "factor": 4.0,
                    "original_max_position_embeddings": 128,
                }
            },
        ),
        ("mistral", {"sliding_window": 8}),
        ("qwen2", {}),
        ("qwen3", {"head_dim": 32, "random_norms": True}),
        # Sliding layers above max_window_layers only: two windows in one model.
        (
            "qwen3",
            {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
        ),
    ],
)
def test_architectures_match_transformers(tmp_path, smollm_folder, arch, overrides) -> None:
    folder = write_tiny_model(tmp_path / arch, smollm_folder, arch=arch, **overrides)
    mine, ref = ours(folder), reference(folder)
    ids = list(range(300, 340))  # longer than the sliding window
    with torch.inference_mode():
        expected = ref(torch.tensor([ids])).logits[0].float()
    assert (full_logits(mine, ids) - expected).abs().max().item() < 1e-3
    # And generation through the cache (decode path, windowed reads) agrees too.
    with torch.inference_mode():
        out = ref.generate(
            torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False
        )
    assert greedy_ids(mine, ids, 12) == out[0, len(ids) :].tolist()


def test_sliding_window_sequences_share_a_small_kv_cache(tmp_path, smollm_folder) -> None:
    """Every layer of this Mistral reads its last 8 keys, so the engine gives back the
    blocks behind the window as it goes: four requests of 40 + 100 tokens (9 blocks of
    16 each) run side by side in a cache of 12 blocks, none preempted, each with the
    tokens it gets alone in a cache that holds it all."""
    folder = write_tiny_model(tmp_path / "mistral", smollm_folder, arch="mistral", sliding_window=8)
    mine = ours(folder)
    prompts = [list(range(300 + 7 * i, 340 + 7 * i)) for i in range(4)]
    alone = [greedy_ids(mine, p, 100) for p in prompts]
    cfg = mine.model.config
    kv_types = resolve_kv_types(("auto", "auto"), torch.float32, TEST_DEVICE)
    per_token = PagedKVCache.bytes_per_token(
        cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, *kv_types
    )
    gb = 12.5 * 16 * per_token / 1e9  # 12 blocks of 16 tokens
    small = build_engine(mine, EngineConfig(max_context=4096, kv_cache_memory=gb))
    assert small.blocks.num_blocks == 12
    preempted = []
    preempt = small.scheduler._preempt
    small.scheduler._preempt = lambda seq: (preempted.append(seq), preempt(seq))  # type: ignore[method-assign]
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    seqs = [small.requests[small.add_request(p, params)].seq for p in prompts]
    side_by_side = 0
    while small.scheduler.has_work():
        small.step()
        side_by_side = max(side_by_side, len(small.scheduler.running))
    assert [s.token_ids[40:] for s in seqs] == alone
    assert side_by_side == 4 and not preempted


def test_unsupported_architecture_lists_the_supported_ones(tmp_path, smollm_folder) -> None:
    folder = tmp_path / "gemma1"
    folder.mkdir()
    raw = json.loads((smollm_folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "architectures": ["GemmaForCausalLM"]}))
    with pytest.raises(ModelFormatError, match=r"'GemmaForCausalLM'.*Gemma3ForCausalLM.*Qwen3"):
        ours(folder)
    with pytest.raises(ModelFormatError, match=r"'gemma'.*gemma3.*qwen3"):
        hf_architecture_for_gguf("gemma")
