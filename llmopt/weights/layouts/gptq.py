"""The GPTQ checkpoint layout (AutoGPTQ / GPTQModel "gptq" format, read by vLLM,
transformers and GPTQModel). For bits b, f = 32 / b values share an int32:

  <linear>.qweight  int32 (in / f, out): q[o, i] in bits b*(i % f) of row i // f
  <linear>.qzeros   int32 (G, out / f): zero[o, g] in bits b*(o % f) of column o // f,
                    minus one in every field, subtracted from the whole word (0x11111111
                    for 4 bits) the way AutoGPTQ and GPTQModel do, so a zero of 0 borrows
                    from the next field; "gptq_v2" stores the zeros as they are
  <linear>.scales   fp16 (G, out)
  <linear>.g_idx    int32 (in,): the group of each input channel

With act-order (desc_act) g_idx is not sorted: the channels are reordered so that
each group is contiguous, and the runtime permutes its input the same way.
"""

from __future__ import annotations

from typing import Any

import torch

from llmopt.errors import ModelFormatError
from llmopt.weights.qweight import QuantizedWeight

SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def _ones(bits: int) -> int:
    """1 in every b-bit field of a 32-bit word: GPTQ's v1 zero-point offset."""
    return sum(1 << (bits * k) for k in range(32 // bits))


def _pack_int32(values: torch.Tensor, bits: int, minus: int = 0) -> torch.Tensor:
    """values (n, m) small ints -> int32 (n / f, m), f = 32 / bits along dim 0; `minus`
    is subtracted from each 32-bit word (modulo 2^32)."""
    f = 32 // bits
    v = values.to(torch.int64).reshape(-1, f, values.shape[1])
    shifts = (torch.arange(f, dtype=torch.int64) * bits)[None, :, None]
    word = ((v << shifts).sum(dim=1) - minus) % 2**32  # (n / f, m) in [0, 2^32)
    return (word - (word >> 31 << 32)).to(torch.int32)  # reinterpret as signed int32


def _unpack_int32(words: torch.Tensor, bits: int, plus: int = 0) -> torch.Tensor:
    """int32 (n / f, m) -> int64 (n, m), the inverse of _pack_int32."""
    f = 32 // bits
    shifts = (torch.arange(f, dtype=torch.int64) * bits)[None, :, None]
    unsigned = (words.to(torch.int64) + plus) % 2**32
    v = (unsigned[:, None, :] >> shifts) & (2**bits - 1)
    return v.reshape(-1, words.shape[1])


def pack(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    out, n = qw.shape
    f = 32 // qw.bits
    if n % f or out % f:
        raise ModelFormatError(f"GPTQ layout needs both dimensions divisible by {f}: {out}x{n}")
    q, g_idx = qw.q, torch.arange(n, dtype=torch.int32) // qw.group_size
    if qw.perm is not None:  # act-order: back to the input's channel order, g_idx says
        q, g_idx = torch.empty_like(q), torch.empty_like(g_idx)
        q[:, qw.perm], g_idx[qw.perm] = qw.q, torch.arange(n, dtype=torch.int32) // qw.group_size
    return {
        "qweight": _pack_int32(q.T, qw.bits),
        "qzeros": _pack_int32(qw.integer_zero(), qw.bits, _ones(qw.bits)).T.contiguous(),
        "scales": qw.scale.T.half().contiguous(),
        "g_idx": g_idx,
    }


def unpack(t: dict[str, torch.Tensor], qcfg: dict[str, Any]) -> QuantizedWeight:
    bits = int(qcfg["bits"])
    if bits not in (2, 4, 8):
        raise ModelFormatError(f"GPTQ layout: {bits}-bit weights are not supported")
    q = _unpack_int32(t["qweight"], bits).T  # (out, in)
    plus = 0 if qcfg.get("checkpoint_format") == "gptq_v2" else _ones(bits)
    zero = _unpack_int32(t["qzeros"].T.contiguous(), bits, plus).T  # (G, out)
    scale = t["scales"].float()  # (G, out)
    n = q.shape[1]
    groups = scale.shape[0]
    g_idx = t.get("g_idx")
    perm = None
    if g_idx is not None:
        g_idx = g_idx.long()
        if (g_idx[1:] < g_idx[:-1]).any():  # act-order: make each group contiguous
            perm = torch.argsort(g_idx, stable=True)
            q, g_idx = q[:, perm], g_idx[perm]
        if not torch.equal(g_idx, torch.arange(n) // (n // groups)):
            raise ModelFormatError("GPTQ layout: groups of unequal size are not supported")
    return QuantizedWeight(
        q.to(torch.uint8).contiguous(),
        scale.T.contiguous(),
        zero.T.float().contiguous(),
        bits,
        n // groups,
        perm,
    )
