"""The KV cache's element types (layers/kv_types.py, kernels/kv_types.h): each type's
round trip within its bound, the C store writing torch's bits at the edges (zero rows,
tiny scales, ties), the capacity each type gives a budget, and the real model's logits
and perplexity over a low-precision cache."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from llmopt.cli.main import app
from llmopt.corpus import held_out_text
from llmopt.engine.config import EngineConfig
from llmopt.engine.factory import build_engine
from llmopt.errors import UsageError
from llmopt.layers.attention_backend import TorchAttention
from llmopt.layers.attention_metadata import AttentionMetadata
from llmopt.layers.kv_cache import PagedKVCache
from llmopt.layers.kv_types import KV_TYPES
from llmopt.layers.native_attention import NativeCpuAttention
from llmopt.loader.load import LoadedModel, load_model
from llmopt.models.scoring import Scorer
from llmopt.store.store import Store
from tests.conftest import REAL_HOME, require_kernel
from tests.test_attention_backend import empty_kv


def _rows(seed: int = 0) -> torch.Tensor:
    """(64, 4, 64) values spanning magnitudes from 1e-4 to 1e3, with outliers."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 4, 64, generator=g)
    x *= torch.logspace(-4, 3, 64)[:, None, None]
    x[::7, :, 3] *= 40  # an outlier per row: the scale is its, the rest rounds coarser
    return x


@pytest.mark.parametrize("name", list(KV_TYPES))
def test_round_trip_is_within_each_types_bound(name: str) -> None:
    kind = KV_TYPES[name]
    x = _rows()
    codes, scale = kind.quantize(x)
    assert codes.dtype == kind.storage and (scale is None) == (not kind.scaled)
    back = kind.dequantize(codes, scale, torch.float32)
    err = (back - x).abs()
    if name == "fp32":
        assert torch.equal(back, x)
        return
    if name in ("bf16", "fp16"):  # half a step of 8 or 11 significant bits
        half_step = 2.0**-8 if name == "bf16" else 2.0**-11
        tiny = 0.0 if name == "bf16" else 2.0**-25  # fp16 subnormals: a fixed step
        assert (err <= half_step * x.abs() + tiny).all()
        return
    s = scale.float()[..., None]
    fp32 = 1e-6 * x.abs()  # the rounding of the product code * scale
    # bf16 scales: the largest value clips by at most a quarter step, inside the bound.
    if name == "int8":
        assert (err <= 0.5 * s + fp32).all()
    else:  # e4m3: half a step is 2^-4 relative, subnormals 2^-9 apart
        assert (err <= 2.0**-4 * x.abs() + 2.0**-10 * s + fp32).all()
    # And not looser than the bound needs (rows with an outlier 40x their others round
    # the others coarsely: measured 1.7% for int8; fp8, relative, 0.9%).
    rel = (err.norm() / x.norm()).item()
    assert rel < (0.025 if name == "int8" else 0.04)


@pytest.mark.parametrize("name", ["int8", "fp8", "fp16", "bf16"])
def test_the_native_store_writes_torchs_bits_at_the_edges(name: str) -> None:
    """Values go to the cache as they are (no rotary), so the C store must give the
    torch path's codes and scales exactly: for a zero row, a row so small its fp16
    scale is subnormal, exact ties of the rounding, and values at the types' limits."""
    native = require_kernel(NativeCpuAttention.load())
    heads, kv_heads, dim = 2, 8, 64
    v = torch.randn(kv_heads, dim)
    v[0] = 0.0  # scale 0: codes 0
    v[1] *= 1e-6  # amax / 127 would be an fp16 subnormal
    v[2] = 0.25 * (torch.arange(dim) - 31.5)  # with scale 0.25 (amax 31.75), ties at .5
    v[2, 0] = 127 * 0.25
    v[3] = torch.tensor([448.0, -448.0, 2.0**-9, 2.0**-10, 3 * 2.0**-10] + [1.0] * (dim - 5))
    v[4] = torch.tensor([65504.0, 1e-8, -1e-8] + [0.5] * (dim - 3))  # fp16's limits
    v[5, ::2] = 1e-30  # below every subnormal
    qkv = torch.cat([torch.randn(1, (heads + kv_heads) * dim), v.reshape(1, -1)], dim=1)
    cos, sin = torch.ones(1, dim), torch.zeros(1, dim)
    meta = AttentionMetadata(torch.tensor([3]))
    caches = []
    for backend in (TorchAttention(), native):
        kv = empty_kv(8, kv_heads, dim, (name, name))
        backend.rope_and_store(qkv, cos, sin, kv, meta, heads)
        caches.append(kv)
    torch_kv, c_kv = caches
    assert torch.equal(c_kv.v[3].view(torch.uint8), torch_kv.v[3].view(torch.uint8))
    if KV_TYPES[name].scaled:
        assert torch.equal(c_kv.v_scale[3], torch_kv.v_scale[3])
        assert c_kv.v_scale[3, 0] == 0 and (c_kv.v[3, 0].view(torch.uint8) == 0).all()


@pytest.mark.parametrize(
    "k,v", [("fp32", "fp32"), ("bf16", "bf16"), ("int8", "int8"), ("fp8", "int8"), ("int8", "fp32")]
)
def test_capacity_follows_the_real_bytes_per_token(smollm_packed, k: str, v: str) -> None:
    """SmolLM2: 30 layers x 3 KV heads x 64 dims. The engine sizes its blocks from the
    bytes a token takes in the chosen types (an fp16 scale per token and head for int8
    and fp8), and the cache it allocates fits the budget."""
    budget = 0.02
    engine = build_engine(
        smollm_packed,
        EngineConfig(max_context=2048, kv_cache_memory=budget, k_cache_dtype=k, v_cache_dtype=v),
    )
    per_head = sum(64 * KV_TYPES[t].storage.itemsize + 2 * KV_TYPES[t].scaled for t in (k, v))
    per_token = 30 * 3 * per_head
    assert PagedKVCache.bytes_per_token(30, 3, 64, KV_TYPES[k], KV_TYPES[v]) == per_token
    cache = engine.runner.cache
    assert cache.num_blocks == int(budget * 1e9 // (per_token * 16))
    assert cache.nbytes <= budget * 1e9 < cache.nbytes + per_token * 16
    assert engine.kv_capacity_tokens == cache.num_tokens
    fp32_tokens = int(budget * 1e9 // (30 * 3 * 512 * 16)) * 16
    if (k, v) == ("int8", "int8"):  # 132 bytes per token and head against 512
        assert engine.kv_capacity_tokens >= 3.8 * fp32_tokens
    assert engine.kv_cache_description.startswith(k if k == v else f"K {k}, V {v}")


@pytest.fixture(scope="module")
def smollm_packed(smollm_gguf) -> LoadedModel:
    return load_model(smollm_gguf, torch.float32, torch.device("cpu"), Store(REAL_HOME), Console())


def test_logits_over_a_low_precision_cache_stay_close(smollm_fp32) -> None:
    """SmolLM2 in fp32 (dense weights, so the cache's rounding is the only difference)
    over 512 tokens of held-out text: the logits' mean change grows with each type's
    step, from fp16 to fp8, and where fp32 is sure of its next token (a margin over
    1.5 logits) the low-precision caches pick it too, fp8 aside."""
    model = smollm_fp32.model
    ids = smollm_fp32.tokenizer.encode(held_out_text())[:512]
    ref = Scorer(model, 512, ("fp32", "fp32")).logits(ids)
    top2 = ref.topk(2).values
    sure = top2[:, 0] - top2[:, 1] > 1.5
    assert sure.sum() > 150
    change = {}
    for t in ("fp16", "bf16", "int8", "fp8"):
        logits = Scorer(model, 512, (t, t)).logits(ids)
        change[t] = (logits - ref).abs().mean().item()
        if t != "fp8":
            assert torch.equal(logits.argmax(-1)[sure], ref.argmax(-1)[sure]), t
    bounds = {"fp16": 0.005, "bf16": 0.04, "int8": 0.15, "fp8": 0.4}  # measured: 0.002 to 0.18
    assert all(change[t] < bounds[t] for t in bounds), change
    assert change["fp16"] < change["bf16"] < change["int8"] < change["fp8"]


def test_bad_type_names_are_refused_with_the_flag() -> None:
    with pytest.raises(UsageError, match="--kv-cache-dtype must be one of auto, fp32"):
        EngineConfig(kv_cache_dtype="int4")
    with pytest.raises(UsageError, match="--v-cache-dtype must be one of"):
        EngineConfig(v_cache_dtype="q8_0")
    assert EngineConfig(kv_cache_dtype="int8", v_cache_dtype="fp32").kv_types == ("int8", "fp32")
    r = CliRunner().invoke(app, ["run", "--kv-cache-dtype", "fp4", "hello"])
    assert r.exit_code == 2 and "--kv-cache-dtype must be one of" in r.stderr
    assert "Traceback" not in r.stderr


def test_perplexity_reports_the_cost_of_the_cache_type(smollm_gguf) -> None:
    """`bench --perplexity --kv-cache-dtype T` scores the model over that cache and over
    fp32: a small KL divergence for int8, a larger one for fp8."""
    runner = CliRunner()
    out = {}
    for t in ("int8", "fp8"):
        args = ["bench", str(smollm_gguf), "--perplexity", "--ppl-tokens", "300", "--window"]
        r = runner.invoke(app, [*args, "256", "--kv-cache-dtype", t, "--json"])
        assert r.exit_code == 0, r.stderr
        out[t] = json.loads(r.stdout)
        assert out[t]["kv_cache_dtype"] == f"{t}/{t}"
        assert "fp32" in out[t]["reference"]
    assert 0 < out["int8"]["kl_divergence"] < out["fp8"]["kl_divergence"] < 0.05
    assert abs(out["int8"]["perplexity_change_pct"]) < 1.0
