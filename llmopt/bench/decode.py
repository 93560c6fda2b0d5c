"""Single-stream decode timing shared by the decode benchmarks (scripts/): llmopt's
engine, transformers' `generate` and llama-cpp-python, timed the same way.

Decode speed excludes the prompt: (N - 1) tokens over the time from the first
generated token to the last.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from torch import nn

from llmopt.engine.config import EngineConfig
from llmopt.engine.factory import build_engine
from llmopt.engine.sampling_params import SamplingParams
from llmopt.layers.linear import Linear, cpu_has_amx
from llmopt.layers.quant_linear import QuantLinear
from llmopt.loader.load import LoadedModel


def sync(device: str | torch.device) -> None:
    """Wait for the GPU's queued work before reading a clock."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights read per decode step: every parameter once but the embedding
    table (one row is read; a tied table is read whole as the lm_head), and, for
    quantized linears, the operands their one-row kernel reads (integers, scales)."""
    params = {
        id(p): p
        for name, p in model.named_parameters(remove_duplicate=False)
        if not name.startswith("embed_tokens.")
    }
    total = sum(p.numel() * p.element_size() for p in params.values())
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += sum(b.numel() * b.element_size() for b in m.decode_operands())
        elif isinstance(m, Linear) and m.packed is not None and m.weight.numel() == 0:
            # A prepacked fp32 weight lives in oneDNN's blocked copy, not a parameter.
            total += m.in_features * m.out_features * 4
    return total


def summarize_runs(runs: list[float], bytes_per_token: float) -> dict[str, float]:
    """Median, spread and achieved bandwidth of repeated decode measurements (tok/s)."""
    tps = statistics.median(runs)
    return {
        "tokens_per_s": round(tps, 2),
        "min": round(min(runs), 2),
        "max": round(max(runs), 2),
        "GB_per_s": round(tps * bytes_per_token / 1e9, 2),
        "bytes_per_token_MB": round(bytes_per_token / 1e6, 1),
    }


def kv_bytes_per_step(loaded: LoadedModel, context: int, kv_elem: int) -> int:
    c = loaded.config
    return 2 * c.num_layers * context * c.num_kv_heads * c.head_dim * kv_elem


def llmopt_decode(loaded: LoadedModel, ids: list[int], n: int) -> float:
    engine = build_engine(loaded, EngineConfig(max_context=4096, kv_cache_memory=0.5))
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    *_, last = engine.generate(ids, params)
    assert last.stats is not None
    return last.stats.decode_tokens_per_s


def transformers_decode(
    folder: Path, ids: list[int], n: int, dtype: torch.dtype, device: str = "cpu"
) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    x = torch.tensor([ids], device=device)

    def timed(k: int) -> float:
        t = time.perf_counter()
        model.generate(x, max_new_tokens=k, min_new_tokens=k, do_sample=False)
        sync(device)
        return time.perf_counter() - t

    timed(2)  # warm-up
    first, full = timed(1), timed(n)
    return (n - 1) / (full - first)


def open_llama(path: Path, repack: bool, **kwargs):
    """llama_cpp.Llama on PATH, weight repacking (llama.cpp's "extra buffer types") on or
    off. Off where the CPU has AMX: the llama.cpp vendored by llama-cpp-python 0.3.36,
    built for such a machine, takes AMX for Q4_1/Q8_0 after repacking and dies of an
    illegal instruction (tileloadd) at the first product.
    Raises ImportError without llama-cpp-python."""
    from unittest.mock import patch

    import llama_cpp

    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = repack
        return p

    with patch.object(llama_cpp.llama_cpp, "llama_model_default_params", params):
        return llama_cpp.Llama(model_path=str(path), verbose=False, **kwargs)


def llama_cpp_decode(gguf: Path, prompt: str, n: int, threads: int) -> float | None:
    """None when llama-cpp-python is not installed."""
    try:
        llm = open_llama(gguf, not cpu_has_amx(), n_threads=threads, n_ctx=2048)
    except ImportError:
        return None
    bias = {llm.token_eos(): -1e9}

    def timed(k: int) -> float:
        llm.reset()
        t = time.perf_counter()
        llm.create_completion(prompt, max_tokens=k, temperature=0, logit_bias=bias)
        return time.perf_counter() - t

    timed(2)
    first, full = timed(1), timed(n)
    llm.close()
    return (n - 1) / (full - first)
