"""The AWQ "gemm" checkpoint layout (AutoAWQ; read by vLLM and transformers).
4-bit only; eight values share an int32 along the output dimension, interleaved:

  <linear>.qweight  int32 (in, out / 8): the value of output column 8c + ORDER[k]
                    in bits 4k..4k+3 of column c
  <linear>.qzeros   int32 (G, out / 8): zero points, packed the same way (no offset)
  <linear>.scales   fp16 (G, out)
"""

from __future__ import annotations

from typing import Any

import torch

from llmopt.errors import ModelFormatError
from llmopt.weights.qweight import QuantizedWeight

SUFFIXES = ("qweight", "qzeros", "scales")
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # which of 8 consecutive columns sits in nibble k
SHIFTS = torch.arange(8, dtype=torch.int64) * 4


def _pack(values: torch.Tensor) -> torch.Tensor:
    """(n, out) ints in [0, 16) -> int32 (n, out / 8)."""
    v = values.to(torch.int64).reshape(values.shape[0], -1, 8)[..., list(ORDER)]
    word = (v << SHIFTS).sum(-1)
    return (word - (word >> 31 << 32)).to(torch.int32)


def _unpack(words: torch.Tensor) -> torch.Tensor:
    """int32 (n, out / 8) -> int64 (n, out)."""
    nibbles = (words.to(torch.int64)[..., None] >> SHIFTS) & 0xF  # (n, out / 8, 8) by k
    inverse = [ORDER.index(j) for j in range(8)]  # nibble holding column j
    return nibbles[..., inverse].reshape(words.shape[0], -1)


def pack(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    out, _ = qw.shape
    if qw.bits != 4 or out % 8 or qw.perm is not None:
        raise ModelFormatError("the AWQ layout needs 4-bit weights, out % 8 == 0, no act-order")
    return {
        "qweight": _pack(qw.q.T),  # (in, out / 8)
        "qzeros": _pack(qw.integer_zero().T),  # (G, out / 8)
        "scales": qw.scale.T.half().contiguous(),  # (G, out)
    }


def unpack(t: dict[str, torch.Tensor], qcfg: dict[str, Any]) -> QuantizedWeight:
    bits = int(qcfg.get("bits", qcfg.get("w_bit", 4)))
    version = str(qcfg.get("version", "gemm")).lower()
    if bits != 4 or version != "gemm" or not qcfg.get("zero_point", True):
        raise ModelFormatError(
            f"AWQ checkpoints of version '{version}', {bits} bits, zero_point "
            f"{qcfg.get('zero_point')} are not supported (only 4-bit gemm with zero points)"
        )
    q = _unpack(t["qweight"]).T  # (out, in)
    zero = _unpack(t["qzeros"]).T  # (out, G)
    scale = t["scales"].float().T  # (out, G)
    return QuantizedWeight(
        q.to(torch.uint8).contiguous(),
        scale.contiguous(),
        zero.float().contiguous(),
        4,
        q.shape[1] // scale.shape[1],
    )
