"""The real model on a CUDA device against the same model on the CPU, and what only a GPU
run exercises: the default KV budget from free GPU memory, bf16 on the GPU, the CLI and
the engine process with --device cuda. Skipped without a GPU; scripts/gpu_check.sh runs
these together with the engine, parity and server suites on the GPU
(LLMOPT_TEST_DEVICE=cuda)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from rich.console import Console

from llmopt.engine.config import EngineConfig
from llmopt.engine.factory import build_engine
from llmopt.engine.llm import LLM
from llmopt.engine.sampling_params import SamplingParams
from llmopt.loader.load import LoadedModel, load_model
from llmopt.models.scoring import Scorer
from llmopt.store.store import Store
from tests.conftest import REAL_HOME

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about rain.",
    "Why is the sky blue? Answer in one sentence.",
]


def load(folder, dtype: torch.dtype, device: str) -> LoadedModel:
    return load_model(folder, dtype, torch.device(device), Store(REAL_HOME), Console(stderr=True))


def chat(loaded: LoadedModel, text: str) -> list[int]:
    return loaded.tokenizer.encode_chat([{"role": "user", "content": text}])


def greedy(loaded: LoadedModel, ids: list[int], n: int) -> list[int]:
    engine = build_engine(loaded, EngineConfig(max_context=2048, kv_cache_memory=0.05))
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return [t for d in engine.generate(ids, params) for t in d.token_ids]


@pytest.fixture(scope="module")
def pair(smollm_folder) -> tuple[LoadedModel, LoadedModel]:
    """The converted model, fp32 dense on both devices."""
    return load(smollm_folder, torch.float32, "cuda"), load(smollm_folder, torch.float32, "cpu")


def test_fp32_logits_and_greedy_tokens_match_the_cpu(pair) -> None:
    gpu, cpu = pair
    ids = chat(gpu, "Explain briefly why the sky is blue.")
    on_gpu = Scorer(gpu.model, 2048).logits(ids)
    on_cpu = Scorer(cpu.model, 2048).logits(ids)
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float32
    # Different GEMM kernels, same fp32 arithmetic (TF32 is off by default).
    assert (on_gpu.cpu() - on_cpu).abs().max().item() < 2e-3
    for p in PROMPTS:
        assert greedy(gpu, chat(gpu, p), 32) == greedy(cpu, chat(cpu, p), 32)


def test_default_kv_budget_comes_from_free_gpu_memory(smollm_folder) -> None:
    loaded = load(smollm_folder, torch.bfloat16, "cuda")
    free = torch.cuda.mem_get_info()[0]
    engine = build_engine(loaded, EngineConfig(max_context=2048))
    cache = engine.runner.cache
    assert cache.k.is_cuda and cache.k.dtype == torch.bfloat16  # the KV in the model's dtype
    held = 2 * cache.k.numel() * cache.k.element_size()
    assert 0.4 * free < held <= 0.5 * free  # GPU_MEMORY_FRACTION of what was free
    assert engine.kv_capacity_tokens == cache.num_blocks * cache.block_size


def test_bf16_on_the_gpu_answers_and_batches(smollm_gguf) -> None:
    # The GGUF file by path, device and dtype chosen by "auto": the GPU, bf16.
    llm = LLM(smollm_gguf, kv_cache_memory=0.5)
    p = next(llm.loaded.model.parameters())
    assert p.is_cuda and p.dtype == torch.bfloat16
    params = SamplingParams(temperature=0, max_tokens=24)
    one = llm.generate("What is the capital of France?", params, chat=True)[0]
    assert "Paris" in one.text
    # 48 requests in one batch: every one finishes, and the blocks all come back.
    outs = llm.generate([f"Count to {i}." for i in range(48)], params, chat=True)
    assert all(o.finish_reason in ("stop", "length") and o.token_ids for o in outs)
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


def test_cli_runs_on_cuda(smollm_gguf) -> None:
    question = "What is the capital of France?"
    cmd = [sys.executable, "-m", "llmopt", "run", str(smollm_gguf), question, "--device", "cuda",
           "--temperature", "0", "--max-tokens", "16", "--json"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Paris" in json.loads(r.stdout)["text"]


@pytest.mark.parametrize("kv", ["int8", "fp8", "bf16"])
def test_low_precision_caches_on_the_gpu_match_the_cpus(pair, kv) -> None:
    """On CUDA the torch path stores each type and dequantizes what it gathers: the same
    codes as the CPU's C kernels, so the fp32 model's logits over that cache agree
    across devices as closely as over an fp32 cache."""
    gpu, cpu = pair
    ids = chat(gpu, "Explain briefly why the sky is blue.")
    on_gpu = Scorer(gpu.model, 2048, (kv, kv)).logits(ids).cpu()
    on_cpu = Scorer(cpu.model, 2048, (kv, kv)).logits(ids)
    assert (on_gpu - on_cpu).abs().max().item() < 5e-2  # a code may round the other way
