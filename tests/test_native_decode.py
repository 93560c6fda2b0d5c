"""The native decode step (models/native_decode.py + kernels/decode_layers.c) against the
Python loop over the same blocks: same logits for a decode step of one and of several
sequences (different lengths, blocks not consecutive), dense bf16 and quantized
models, with and without qkv bias, q/k norms (Qwen3), and Gemma 3's blocks with their
sliding-window layers; models it does not take fall back to the loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rich.console import Console

from llmopt.corpus import calibration_text
from llmopt.engine.config import EngineConfig
from llmopt.engine.engine import Engine
from llmopt.engine.factory import build_engine
from llmopt.engine.sampling_params import SamplingParams
from llmopt.engine.scheduler import Step
from llmopt.engine.sequence import Sequence
from llmopt.loader.load import load_model
from llmopt.quant.pipeline import quantize_folder
from llmopt.quant.spec import QuantSpec
from llmopt.store.store import Store
from tests.conftest import require_kernel, write_tiny_model
from tests.test_gemma3 import WINDOW, tiny_gemma

CPU = torch.device("cpu")
PROMPTS = [[5, 9, 13, 200, 31], list(range(40, 61)), list(range(100, 140))]  # 5, 21, 40


def _engine(folder: Path, dtype: torch.dtype, kv: str = "auto") -> Engine:
    loaded = load_model(folder, dtype, CPU, Store(), Console(stderr=True))
    config = EngineConfig(max_context=512, kv_cache_memory=0.01, kv_cache_dtype=kv)
    return build_engine(loaded, config)


def _decode_logits(engine: Engine, prompts: list[list[int]]) -> tuple[torch.Tensor, ...]:
    """Prefill each prompt (Python path), then one decode step of all of them, run
    natively and through the Python loop on the same cache; returns both logits."""
    runner = engine.runner
    seqs = []
    for i, ids in enumerate(prompts):
        seq = Sequence.from_prompt(f"s{i}", ids, SamplingParams())
        assert engine.blocks.allocate(seq)
        prefill = Step()
        prefill.add(seq, len(ids))
        runner.execute(prefill)
        seq.num_computed_tokens = len(ids)
        seq.append(7 + i)  # the prompts' lengths leave room in their last block
        seqs.append(seq)
    step = Step()
    for seq in seqs:
        step.add(seq, 1)
    native = require_kernel(runner.model.native_decode)
    out = []
    for decoder in (native, None):
        runner.model.native_decode = decoder
        _, logits = runner.execute(step)
        out.append(logits)
    runner.model.native_decode = native
    return tuple(out)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, smollm_folder: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("native")
    llama = write_tiny_model(root / "llama", smollm_folder)
    models = {
        "llama": llama,
        "qwen2": write_tiny_model(root / "qwen2", smollm_folder, arch="qwen2"),
        "qwen3": write_tiny_model(root / "qwen3", smollm_folder, arch="qwen3"),
        "gemma3": tiny_gemma(root / "gemma3", smollm_folder),
    }
    specs = [
        ("int4", QuantSpec(4, "rtn", 32, sym=False), 0),
        ("int8", QuantSpec(8, "rtn", 0, sym=True), 0),
        ("gptq", QuantSpec(4, "gptq", 32, sym=True, act_order=True), 512),  # a permutation
    ]
    for name, spec, tokens in specs:
        fmt = "gptq" if name == "gptq" else "llmopt"
        text = calibration_text()
        quantize_folder(llama, root / name, spec, fmt, text, tokens, Console(stderr=True))
        models[name] = root / name
    return models


@pytest.mark.parametrize(
    "model,dtype",
    [
        ("llama", torch.bfloat16),
        ("qwen2", torch.bfloat16),  # qkv bias
        ("qwen3", torch.bfloat16),  # q/k norms
        ("gemma3", torch.bfloat16),  # four norms, GELU, local (window 8) and global layers
        ("int4", torch.bfloat16),
        ("int4", torch.float32),
        ("int8", torch.bfloat16),
        ("gptq", torch.bfloat16),  # act-order: inputs permuted
    ],
)
@pytest.mark.parametrize("batch", [1, 3])
def test_native_step_matches_the_python_loop(tiny_models, model, dtype, batch) -> None:
    engine = _engine(tiny_models[model], dtype)
    native, python = _decode_logits(engine, PROMPTS[:batch])
    assert native.shape == (batch, 49152)
    if model == "gemma3":  # rows of 21 and 40 keys read 8 in the local layers
        assert engine.runner.model.native_decode.windows == [WINDOW, None]
    # The same kernels in the same order on both paths (norms, linears, rotary and
    # store, attention, the gate's activation): the same bits, so that a sequence's
    # output does not depend on whether its step also prefills (the loop) or not.
    assert torch.equal(native, python)


@pytest.mark.parametrize("kv", ["int8", "fp8", "bf16"])
def test_native_step_reads_low_precision_caches_as_the_loop_does(tiny_models, kv) -> None:
    """decode_layers.c over an int8, fp8 or bf16 cache (rope_store writing the codes,
    paged_decode reading them) against the Python loop over the same cache."""
    engine = _engine(tiny_models["int4"], torch.bfloat16, kv)
    assert engine.runner.cache.k_type.name == kv
    native, python = _decode_logits(engine, PROMPTS)
    assert torch.equal(native, python)


def test_models_without_native_kernels_keep_the_python_loop(tiny_models) -> None:
    # fp32 dense weights are prepacked for oneDNN: no kernel of the native step reads them.
    engine = _engine(tiny_models["llama"], torch.float32)
    assert engine.runner.model.native_decode is None
    deltas = engine.generate([5, 9, 13], SamplingParams(temperature=0, max_tokens=4))
    assert sum(len(d.token_ids) for d in deltas) == 4
