"""The KV cache's element types: how keys and values are stored, in torch.

fp32, bf16 and fp16 hold the values themselves. int8 and fp8 (e4m3) hold codes with a
scale per token and KV head, stored in bf16 (fp16's subnormals would leave a head of
small values a scale of few bits): value = code * scale, with
scale = amax / 127 (int8) or amax / 448 (fp8, its largest finite value) over the
token's D values of that head. A scale per token, not per block: a block fills a token
at a time, so a scale set by its first tokens would clip later ones, and rescaling
would round the stored codes twice. Each slot then depends on its own token alone,
whatever shares its batch or block.

The C kernels (kernels/kv_types.h) store and read the same bits; `code` is their name
for each type.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmopt.errors import UsageError

SCALE_DTYPE = torch.bfloat16


@dataclass(frozen=True)
class KVType:
    name: str
    storage: torch.dtype  # element type of the stored codes
    code: int  # kernels/kv_types.h's KV_* constant
    qmax: float | None = None  # scaled types: the largest code magnitude

    @property
    def scaled(self) -> bool:
        return self.qmax is not None

    def bytes_per_row(self, head_dim: int) -> int:
        """Bytes one token takes for one KV head: codes, and its bf16 scale."""
        return head_dim * self.storage.itemsize + (SCALE_DTYPE.itemsize if self.scaled else 0)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (..., D) -> (codes (..., D) in `storage`, scales (...) bf16 or None)."""
        if self.qmax is None:
            return x.to(self.storage), None
        x = x.float()
        scale = (x.abs().amax(-1) / self.qmax).to(SCALE_DTYPE)
        s = scale.float()[..., None]
        # x / s, as kv_store divides (not x * (1 / s), which rounds differently).
        c = torch.where(s > 0, x / s.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        c = c.clamp(-self.qmax, self.qmax)
        codes = c.round().to(self.storage) if self.storage == torch.int8 else c.to(self.storage)
        return codes, scale

    def dequantize(
        self, codes: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        """codes (..., D) and scales (...) -> values (..., D) in dtype."""
        if scale is None:
            return codes.to(dtype)
        return (codes.float() * scale.float()[..., None]).to(dtype)


KV_TYPES = {
    t.name: t
    for t in (
        KVType("fp32", torch.float32, 0),
        KVType("bf16", torch.bfloat16, 1),
        KVType("fp16", torch.float16, 2),
        KVType("int8", torch.int8, 3, 127.0),
        KVType("fp8", torch.float8_e4m3fn, 4, 448.0),
    )
}
KV_TYPE_NAMES = ("auto", *KV_TYPES)


def check_kv_type_name(name: str, flag: str) -> None:
    if name not in KV_TYPE_NAMES:
        raise UsageError(f"{flag} must be one of {', '.join(KV_TYPE_NAMES)}, not {name!r}")


def resolve_kv_type(name: str, model_dtype: torch.dtype, device: torch.device) -> KVType:
    """The type a setting names; "auto" is the model's dtype, but fp32 on the CPU."""
    if name != "auto":
        return KV_TYPES[name]
    if device.type == "cpu" or model_dtype == torch.float32:
        return KV_TYPES["fp32"]
    return KV_TYPES["bf16" if model_dtype == torch.bfloat16 else "fp16"]


def resolve_kv_types(
    names: tuple[str, str], model_dtype: torch.dtype, device: torch.device
) -> tuple[KVType, KVType]:
    """The (K, V) types a pair of settings names."""
    k, v = (resolve_kv_type(n, model_dtype, device) for n in names)
    return k, v
