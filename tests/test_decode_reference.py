"""The bf16 decode kernels against an independent reference: torch in fp32 (and float64)
on the same bf16 weights, upcast. test_native_decode.py compares the native step with
llmopt's own Python path over the same kernels; here the reference shares no llmopt
code: a plain matmul for kernels/gemv_bf16.c, transformers' model for a whole native
decode step (kernels/decode_layers.c) of a tiny random model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmopt.engine.llm import LLM
from llmopt.engine.sampling_params import SamplingParams
from llmopt.kernels.build import load
from llmopt.layers import linear
from llmopt.models.native_decode import NativeDecoder
from tests.conftest import require_kernel, write_tiny_model

U_FP32 = 2.0**-24  # unit roundoff of fp32 (24-bit significand)
U_BF16 = 2.0**-8  # of bf16 (8-bit significand): round to nearest is within u relative


@pytest.mark.parametrize("rows", [1, 3, 8, 13])  # 1: decode's own path; 13: two blocks of 8
@pytest.mark.parametrize("k", [576, 72])  # 72: a tail of 8 after the 16-wide loop
@pytest.mark.parametrize("x_bf16,y_bf16", [(False, False), (True, True), (True, False)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_bf16_matches_float64_on_the_upcast_weights(rows, k, x_bf16, y_bf16, bias) -> None:
    """y = x W^T + b against float64 on the same values (bf16 W and, where given, bf16 x,
    upcast exactly). The kernel widens W, multiplies and sums in fp32 and rounds y once:
    any order of the K products and the bias, summed in fp32, is within
    gamma_(K+1) * (sum |x_k w_k| + |b|), gamma_n = n u / (1 - n u) (Higham, 3.1; fused
    multiply-adds only drop roundings); a bf16 y adds one rounding, u_bf16 |y|. A dropped,
    repeated or misread input, or a wrong row, is off by about |x_k w_k|: the fp32 bound
    is some 1e-5 of it, the bf16 one 0.4% of |y|."""
    gemv = require_kernel(linear._gemv_bf16())
    n = 37  # rows of W: not a multiple of the two the kernel pairs
    g = torch.Generator().manual_seed(rows * 1000 + k)
    w = (0.05 * torch.randn(n, k, generator=g)).bfloat16()
    x = torch.randn(rows, k, generator=g)
    x = x.bfloat16() if x_bf16 else x
    b = torch.randn(n, generator=g) if bias else None
    y = torch.empty(rows, n, dtype=torch.bfloat16 if y_bf16 else torch.float32)
    rc = gemv(
        x.data_ptr(), int(x_bf16), rows, k, w.data_ptr(), n,
        None if b is None else b.data_ptr(), y.data_ptr(), int(y_bf16),
    )  # fmt: skip
    assert rc == 0
    x64, w64 = x.double(), w.double()
    want = x64 @ w64.T + (0 if b is None else b.double())
    magnitude = x64.abs() @ w64.abs().T + (0 if b is None else b.double().abs())
    gamma = (k + 1) * U_FP32 / (1 - (k + 1) * U_FP32)
    bound = gamma * magnitude
    if y_bf16:
        bound = bound + U_BF16 * (want.abs() + bound)
    err = (y.double() - want).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"


def test_gemv_bf16_refuses_what_it_does_not_take() -> None:
    gemv = require_kernel(linear._gemv_bf16())
    x, w, y = torch.randn(1, 12), torch.randn(4, 12).bfloat16(), torch.empty(1, 4)
    assert gemv(x.data_ptr(), 0, 1, 12, w.data_ptr(), 4, None, y.data_ptr(), 0) == -1  # K % 8


PROMPTS = [[5, 9, 13, 200, 31], list(range(40, 61)), list(range(100, 140))]  # 5, 21, 40
STEPS = 12


def _upcast_reference(folder: Path, dtype: torch.dtype):
    """transformers' model of the folder in `dtype`; for fp32, with its weights rounded
    to bf16 first: the values llmopt's bf16 model holds, upcast exactly."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().to(dtype))
    return model


@pytest.mark.parametrize(
    "arch,batch",
    [("llama", 1), ("llama", 3), ("qwen2", 3)],  # qwen2: qkv bias; 1 and 3 rows a step
)
def test_native_decode_steps_match_fp32_transformers(
    tmp_path, smollm_folder, monkeypatch, arch, batch
) -> None:
    """Greedy decoding of a tiny random bf16 model, every step after the first through
    the native step, against transformers in fp32 on the same bf16 weights, fed the
    tokens llmopt chose. Compared: the log-probabilities of the 20 likeliest tokens.

    The bound. llmopt's bf16 model rounds its activations to bf16 after every operation,
    as torch's bf16 arithmetic does: about 20 roundings of relative size u_bf16 = 2^-8 on
    the way to a logit (2 blocks of norm, qkv, attention, o, residual, norm, gate/up,
    silu, product, down; the final norm; the head's bf16 logits), which the random
    weights amplify in no way one can bound tightly by hand. So the bound is measured
    on the same tokens: transformers' own bf16 forward of this model is that far from
    fp32 (here up to 0.13 to 0.2 in log-probability, with logits within +-8), and the
    native step may be twice as far (the same roundings, summed in other orders), plus
    2 x 2^-6: a log-probability moves by up to twice its logits' error, and bf16 logits
    under 8 are rounded by up to 2^-6. A kernel that reads a wrong slot, drops a key or
    a layer, or mixes the rows of a batch moves them by 0.2 to 5 (dropping the first
    key: 0.23 to 5.7 on these prompts)."""
    require_kernel(load("decode_layers"))
    folder = write_tiny_model(tmp_path / arch, smollm_folder, arch=arch)
    decoded_rows = []
    native_call = NativeDecoder.__call__

    def counting(self, x, *args):
        decoded_rows.append(x.shape[0])
        return native_call(self, x, *args)

    monkeypatch.setattr(NativeDecoder, "__call__", counting)
    llm = LLM(str(folder), device="cpu", dtype="bfloat16", kv_cache_memory=0.01, max_context=512)
    engine = llm.engine
    prompts = PROMPTS[:batch]
    params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True, logprobs=20)
    rids = [engine.add_request(p, params) for p in prompts]
    got: dict[str, list] = {rid: [] for rid in rids}
    while engine.has_unfinished():
        for rid in engine.step():
            for delta in engine.take(rid):
                got[rid] += delta.logprobs or []
    # The first token of each comes from its prefill; every later one from a native step.
    assert sum(decoded_rows) == batch * (STEPS - 1)

    fp32, bf16 = _upcast_reference(folder, torch.float32), _upcast_reference(folder, torch.bfloat16)
    native_err, torch_err, checked = [], [], []
    for rid, prompt in zip(rids, prompts, strict=True):
        steps = got[rid]
        assert len(steps) == STEPS
        ids = torch.tensor([prompt + [s.token_id for s in steps]])
        rows = slice(len(prompt) - 1, len(prompt) - 1 + STEPS)  # the positions predicting them
        with torch.no_grad():
            want = fp32(ids).logits[0, rows].log_softmax(-1)
            torch_bf16 = bf16(ids).logits[0, rows].float().log_softmax(-1)
        for step, s in enumerate(steps):
            top = torch.tensor([t for t, _ in s.top])
            ours = torch.tensor([lp for _, lp in s.top])
            native_err.append((ours - want[step, top]).abs().max().item())
            torch_err.append((torch_bf16[step, top] - want[step, top]).abs().max().item())
            checked.append((s.token_id, want[step]))
    bound = 2 * max(torch_err) + 2 * 2**-6
    assert max(native_err) <= bound, (max(native_err), bound)
    # Greedy takes the reference's top token wherever that is not a near tie.
    for token, lp in checked:
        first, second = lp.topk(2).values.tolist()
        if first - second > 2 * bound:
            assert token == int(lp.argmax())
