"""Our decoder against transformers' reference implementation on the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rich.console import Console

from llmopt.engine.engine import Engine
from llmopt.engine.runner import Runner
from llmopt.engine.sampling_params import SamplingParams
from llmopt.loader.load import LoadedModel, load_model
from llmopt.store.store import Store
from tests.conftest import write_tiny_model

CPU = torch.device("cpu")


def ours(folder: Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    return load_model(folder, dtype, CPU, Store(), Console(stderr=True))


def reference(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def full_logits(loaded: LoadedModel, ids: list[int]) -> torch.Tensor:
    """Logits at every position from our model in one prefill: (T, V)."""
    runner = Runner(loaded.model, 4096)
    runner.reserve(len(ids))
    with torch.inference_mode():
        t = torch.tensor(ids)
        hidden = loaded.model(t, torch.arange(len(ids)), runner.cache, 0)
        return loaded.model.logits(hidden)


def greedy_ids(loaded: LoadedModel, ids: list[int], n: int) -> list[int]:
    engine = Engine(Runner(loaded.model, 4096), loaded.tokenizer, loaded.eos_ids)
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return [t for d in engine.generate(ids, params) for t in d.token_ids]


@pytest.fixture(scope="module")
def smollm(smollm_folder: Path) -> tuple[LoadedModel, object]:
    return ours(smollm_folder), reference(smollm_folder)


def chat_ids(loaded: LoadedModel, text: str) -> list[int]:
    prompt = loaded.tokenizer.apply_chat_template([{"role": "user", "content": text}])
    return loaded.tokenizer.encode(prompt, add_bos=False)


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


def test_incremental_decode_matches_one_prefill(smollm) -> None:
    # Decoding token by token through the KV cache gives the logits of one long prefill.
    mine, _ = smollm
    ids = chat_ids(mine, "Count to five.")
    runner = Runner(mine.model, 4096)
    steps = [runner.prefill(ids[:5], 0)]
    steps += [runner.decode(tok, pos) for pos, tok in enumerate(ids[5:], start=5)]
    full = full_logits(mine, ids)[4:]
    assert (torch.stack(steps) - full).abs().max().item() < 1e-3


def test_chunked_prefill_matches_one_prefill(smollm, monkeypatch) -> None:
    import llmopt.engine.runner as runner_mod

    mine, _ = smollm
    ids = chat_ids(mine, "A longer question about the history of the printing press. " * 4)
    whole = Runner(mine.model, 4096).prefill(ids, 0)
    monkeypatch.setattr(runner_mod, "PREFILL_CHUNK", 7)
    chunked = Runner(mine.model, 4096).prefill(ids, 0)
    assert (whole - chunked).abs().max().item() < 1e-3


def test_bf16_answers_the_capital_question(smollm_folder) -> None:
    loaded = ours(smollm_folder, torch.bfloat16)
    engine = Engine(Runner(loaded.model, 4096), loaded.tokenizer, loaded.eos_ids)
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
