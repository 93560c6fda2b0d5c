"""llmopt's own layout: what QuantizedWeight holds, bytes packed row-major.

  <linear>.qweight  uint8 (out, in * bits / 8); for 4 bits, column 2j in the low
                    nibble of byte j and column 2j + 1 in the high nibble
  <linear>.scales   fp16 (out, G)
  <linear>.qzeros   uint8 (out, G)
  <linear>.perm     int32 (in,), only for an input-channel order other than 0..in-1

Unlike the GPTQ and AWQ layouts it holds int8 as well as int4, any zero point and
per-row groups, so any quantized model can be stored without loss.
"""

from __future__ import annotations

from typing import Any

import torch

from llmopt.errors import ModelFormatError
from llmopt.weights.qweight import QuantizedWeight

SUFFIXES = ("qweight", "scales", "qzeros", "perm")  # perm: only with act-order


def pack(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    q = qw.q
    if qw.bits == 4:
        q = q[:, 0::2] | (q[:, 1::2] << 4)
    zero = qw.integer_zero().to(torch.uint8)
    out = {"qweight": q.contiguous(), "scales": qw.scale.half(), "qzeros": zero}
    if qw.perm is not None:
        out["perm"] = qw.perm.to(torch.int32)
    return out


def unpack(t: dict[str, torch.Tensor], qcfg: dict[str, Any]) -> QuantizedWeight:
    bits = int(qcfg["bits"])
    packed = t["qweight"]
    if bits == 4:
        q = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
    elif bits == 8:
        q = packed
    else:
        raise ModelFormatError(f"llmopt layout: {bits}-bit weights are not supported")
    groups = t["scales"].shape[1]
    perm = t["perm"].long() if "perm" in t else None
    return QuantizedWeight(
        q.contiguous(), t["scales"].float(), t["qzeros"].float(), bits, q.shape[1] // groups, perm
    )
