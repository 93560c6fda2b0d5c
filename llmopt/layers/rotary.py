"""Rotary position embeddings (RoPE) and the frequency-scaling variants of the
supported configs: default, linear, dynamic (NTK), llama3 and yarn."""

from __future__ import annotations

import math
from typing import Any

import torch

from llmopt.errors import ModelFormatError

SUPPORTED_SCALING = ("default", "linear", "dynamic", "llama3", "yarn")


def _exponents(head_dim: int) -> torch.Tensor:
    # 2i / D for the D/2 rotary pairs; on the CPU even inside a meta-device context.
    return torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim


def inv_frequencies(
    head_dim: int, theta: float, scaling: dict[str, Any] | None, max_positions: int
) -> tuple[torch.Tensor, float]:
    """Return (inv_freq of shape (head_dim/2,), attention scaling factor for cos/sin)."""
    # fp32 as in the reference implementations, so that fp32 logits agree closely.
    inv = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim)
    )
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv.float(), 1.0
    assert scaling is not None
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return (inv / factor).float(), 1.0
    if kind == "dynamic":
        # NTK-aware scaling at the full context: the base grows so that the
        # longest position still lands inside the trained range.
        orig = int(scaling.get("original_max_position_embeddings", max_positions))
        seq = max(max_positions, orig)
        base = theta * ((factor * seq / orig) - (factor - 1)) ** (head_dim / (head_dim - 2))
        inv = 1.0 / (
            base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim)
        )
        return inv, 1.0
    if kind == "llama3":
        return _llama3(inv, scaling, factor).float(), 1.0
    if kind == "yarn":
        return _yarn(inv, head_dim, theta, scaling, factor, max_positions)
    raise ModelFormatError(
        f"rope scaling '{kind}' is not supported; supported: {', '.join(SUPPORTED_SCALING)}"
    )


def _llama3(inv: torch.Tensor, s: dict[str, Any], factor: float) -> torch.Tensor:
    low = float(s.get("low_freq_factor", 1.0))
    high = float(s.get("high_freq_factor", 4.0))
    orig = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    # Long wavelengths are slowed by `factor`, short ones kept, the band between
    # interpolated smoothly.
    smooth = (orig / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > orig / low, inv / factor, inv)
    mid = (wavelen <= orig / low) & (wavelen >= orig / high)
    return torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)


def _yarn(
    inv: torch.Tensor, dim: int, theta: float, s: dict[str, Any], factor: float, max_pos: int
) -> tuple[torch.Tensor, float]:
    orig = int(s.get("original_max_position_embeddings", max_pos))
    beta_fast = float(s.get("beta_fast", 32.0))
    beta_slow = float(s.get("beta_slow", 1.0))

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    ramp = (torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / max(high - low, 1e-3)
    extrapolation = 1 - ramp.clamp(0, 1)
    inv = (inv / factor) * (1 - extrapolation) + inv * extrapolation
    mscale = float(s.get("attention_factor") or (0.1 * math.log(factor) + 1.0))
    return inv.float(), mscale


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables, (P, D/2) each (the rotate-half layout repeats them), computed for
    the positions used so far and grown by doubling: tables for every position a model
    allows would hold 64 MB for Gemma 3 (32k positions, D = 256, two rotary bases)
    that short chats never read. Each position's row is computed once, by the same
    arithmetic whenever it is, so a token's rotation does not depend on when it came.
    `forward(positions)` gathers rows for a flat batch."""

    FIRST = 4096  # positions in the first tables

    def __init__(
        self, head_dim: int, theta: float, scaling: dict[str, Any] | None, max_positions: int
    ) -> None:
        super().__init__()
        # Computed on the CPU even inside a meta-device context (the model is built on
        # "meta" to skip weight init) and moved with the module.
        self.inv, self.mscale = inv_frequencies(head_dim, theta, scaling, max_positions)
        self.max_positions = max_positions
        empty = torch.empty(0, head_dim // 2, device="cpu")
        self.register_buffer("cos", empty, persistent=False)
        self.register_buffer("sin", empty.clone(), persistent=False)

    def _grow(self, needed: int) -> None:
        n = min(max(self.FIRST, 2 * len(self.cos), needed), max(self.max_positions, needed))
        t = torch.arange(len(self.cos), n, dtype=torch.float32, device=self.cos.device)
        freqs = torch.outer(t, self.inv.to(self.cos.device))  # (new, D/2)
        self.cos = torch.cat([self.cos, freqs.cos() * self.mscale])
        self.sin = torch.cat([self.sin, freqs.sin() * self.mscale])

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Gathered and cast once per forward pass, shared by every layer.
        needed = int(positions.max()) + 1 if len(positions) else 0
        if needed > len(self.cos):
            self._grow(needed)
        cos, sin = self.cos[positions].to(dtype), self.sin[positions].to(dtype)
        return torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)  # each (T, D)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (T, H, D); cos/sin: (T, D) in x's dtype. Rotates pairs (i, i + D/2)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
