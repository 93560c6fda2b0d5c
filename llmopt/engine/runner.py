"""Executes forward steps of one sequence: prefill in chunks, then one token at a time.

The runner owns the KV cache. It does not decide anything: the engine tells it which
tokens to run.
"""

from __future__ import annotations

import torch

from llmopt.models.llama import KVCache, LlamaForCausalLM

PREFILL_CHUNK = 1024  # bounds activation memory for long prompts


class Runner:
    def __init__(self, model: LlamaForCausalLM, max_context: int) -> None:
        self.model = model
        self.max_context = max_context
        p = next(model.parameters())
        self.device = p.device
        # On the CPU, attention runs in fp32: small bf16/fp16 batched matmuls take a slow
        # path there (4x slower for one decode step on AVX2), and the KV cache of a
        # short context is small next to the weights.
        self.kv_dtype = torch.float32 if self.device.type == "cpu" else p.dtype
        self.cache: KVCache | None = None

    def reserve(self, tokens: int) -> None:
        """Make room for `tokens` positions, keeping what is cached. Grows by doubling."""
        have = self.cache.capacity if self.cache else 0
        if tokens <= have:
            return
        size = min(self.max_context, max(tokens, 2 * have, 256))
        new = KVCache(self.model.config, size, self.kv_dtype, self.device)
        if self.cache is not None:
            new.k[:, :have] = self.cache.k
            new.v[:, :have] = self.cache.v
        self.cache = new

    @torch.inference_mode()
    def prefill(self, ids: list[int], start: int) -> torch.Tensor:
        """Run prompt tokens placed at positions start.. ; return next-token logits (V,)."""
        self.reserve(start + len(ids))
        assert self.cache is not None
        hidden = None
        for lo in range(0, len(ids), PREFILL_CHUNK):
            chunk = torch.tensor(ids[lo : lo + PREFILL_CHUNK], device=self.device)
            pos = torch.arange(start + lo, start + lo + len(chunk), device=self.device)
            hidden = self.model(chunk, pos, self.cache, start + lo)
        assert hidden is not None
        return self.model.logits(hidden[-1:])[0]

    @torch.inference_mode()
    def decode(self, token: int, position: int) -> torch.Tensor:
        """Run one token at `position`; return next-token logits (V,)."""
        self.reserve(position + 1)
        ids = torch.tensor([token], device=self.device)
        pos = torch.tensor([position], device=self.device)
        assert self.cache is not None
        return self.model.logits(self.model(ids, pos, self.cache, position))[0]
