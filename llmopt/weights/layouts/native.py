"""llmopt's own layout: what QuantizedWeight holds, bytes packed row-major.

  <linear>.qweight  uint8 (out, in * bits / 8); for 4 bits, column 2j in the low
                    nibble of byte j and column 2j + 1 in the high nibble
  <linear>.scales   fp16 (out, G)
  <linear>.qzeros   uint8 (out, G) integer zero points; or, on a float-zero grid
  <linear>.qmins    fp16 (out, G) each group's minimum: w = q * scale + min (Q4_1's)
  <linear>.perm     int32 (in,), only for an input-channel order other than 0..in-1

FP4 (quantization_config "fp4": "mxfp4" or "nvfp4") keeps GGUF's blocks instead:

  <linear>.qweight       uint8 (out, in / 32 * 17) MXFP4 or (out, in / 64 * 36) NVFP4
                         blocks, bit for bit as a GGUF file holds them (weights/fp4.py)
  <linear>.tensor_scale  fp32 (1,), NVFP4's tensor scale
  <linear>.perm          as above

Unlike the GPTQ and AWQ layouts it holds int8 as well as int4, any zero point and
per-row groups, so any quantized model can be stored without loss.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from llmopt.errors import ModelFormatError
from llmopt.weights import fp4
from llmopt.weights.qweight import QuantizedWeight

# perm: only with act-order
SUFFIXES = ("qweight", "scales", "qzeros", "qmins", "tensor_scale", "perm")


def required(qcfg: dict[str, Any]) -> tuple[str, ...]:
    """The tensors every quantized linear has under this config; beside them, qzeros or
    qmins (unpack checks)."""
    fp4_blocks = qcfg.get("fp4") and int(qcfg.get("bits", 0)) == 4  # not an int8 head
    return ("qweight",) if fp4_blocks else ("qweight", "scales")


def pack(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    if qw.codebook is not None:
        return _pack_fp4(qw)
    q = qw.q
    if qw.bits == 4:
        q = q[:, 0::2] | (q[:, 1::2] << 4)
    out = {"qweight": q.contiguous(), "scales": qw.scale.half()}
    z = qw.zero
    if torch.equal(z, z.round()) and z.min() >= 0 and z.max() < 2**qw.bits:
        out["qzeros"] = z.to(torch.uint8)
    else:  # a float-zero grid: its minimums, which the grid made fp16 numbers
        out["qmins"] = (-z * qw.scale).half()
    if qw.perm is not None:
        out["perm"] = qw.perm.to(torch.int32)
    return out


def _pack_fp4(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    blocks, t = fp4.to_blocks(replace(qw, perm=None))
    out = {"qweight": blocks}
    if fp4.format_of(replace(qw, perm=None)) == "nvfp4":
        out["tensor_scale"] = torch.tensor([t], dtype=torch.float32)
    if qw.perm is not None:
        out["perm"] = qw.perm.to(torch.int32)
    return out


def _unpack_fp4(t: dict[str, torch.Tensor], fmt: str) -> QuantizedWeight:
    if fmt not in fp4.FORMATS:
        raise ModelFormatError(f"llmopt layout: unknown FP4 format '{fmt}'")
    blocks = t["qweight"]
    width, per_block = fp4.BLOCK[fmt]
    shape = (blocks.shape[0], blocks.shape[1] // width * per_block)
    scale = float(t["tensor_scale"][0]) if "tensor_scale" in t else 1.0
    qw = fp4.from_blocks(blocks, shape, fmt, scale)
    return replace(qw, perm=_perm(t, shape[1]))


def unpack(t: dict[str, torch.Tensor], qcfg: dict[str, Any]) -> QuantizedWeight:
    if qcfg.get("fp4") and int(qcfg["bits"]) == 4:  # an int8 head beside FP4 layers
        return _unpack_fp4(t, str(qcfg["fp4"]))
    bits = int(qcfg["bits"])
    packed = t["qweight"]
    if bits == 4:
        q = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
    elif bits == 8:
        q = packed
    else:
        raise ModelFormatError(f"llmopt layout: {bits}-bit weights are not supported")
    scale = t["scales"].float()
    if "qmins" not in t and "qzeros" not in t:
        raise ValueError("it has neither qzeros nor qmins")
    zero = -t["qmins"].float() / scale if "qmins" in t else t["qzeros"].float()
    perm = _perm(t, q.shape[1])
    return QuantizedWeight(q.contiguous(), scale, zero, bits, q.shape[1] // scale.shape[1], perm)


def _perm(t: dict[str, torch.Tensor], n: int) -> torch.Tensor | None:
    """A linear's input order, checked: the kernels read x[perm[k]] without bounds."""
    if "perm" not in t:
        return None
    perm = t["perm"].long()
    if not torch.equal(perm.sort().values, torch.arange(n, device=perm.device)):
        raise ValueError(f"its perm is not an order of its {n} inputs")
    return perm
