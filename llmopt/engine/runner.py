"""Executes forward steps of one sequence: prefill in chunks, then one token at a time.

The runner owns the KV cache and remembers which tokens it holds, so that a prompt
that starts like the previous sequence (the next turn of a chat) reuses that prefix
instead of computing it again. It does not decide anything: the engine tells it which
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
        self.cached_ids: list[int] = []  # tokens whose keys/values are in the cache, in order

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

    def reusable_prefix(self, prompt: list[int]) -> int:
        """How many leading prompt tokens are already cached. At least the last prompt
        token is always recomputed: its logits pick the first output token."""
        n = 0
        for a, b in zip(self.cached_ids, prompt[:-1], strict=False):
            if a != b:
                break
            n += 1
        return n

    @torch.inference_mode()
    def prefill(self, ids: list[int], start: int) -> torch.Tensor:
        """Run prompt tokens placed at positions start.. ; return next-token logits (V,).

        Positions from `start` on are overwritten; what was cached before stays valid.
        """
        self.cached_ids = self.cached_ids[:start]
        self.reserve(start + len(ids))
        assert self.cache is not None
        hidden = None
        for lo in range(0, len(ids), PREFILL_CHUNK):
            chunk = torch.tensor(ids[lo : lo + PREFILL_CHUNK], device=self.device)
            pos = torch.arange(start + lo, start + lo + len(chunk), device=self.device)
            hidden = self.model(chunk, pos, self.cache, start + lo)
        self.cached_ids += ids
        assert hidden is not None
        return self.model.logits(hidden[-1:])[0]

    @torch.inference_mode()
    def decode(self, token: int, position: int) -> torch.Tensor:
        """Run one token at `position`; return next-token logits (V,)."""
        del self.cached_ids[position:]
        self.reserve(position + 1)
        ids = torch.tensor([token], device=self.device)
        pos = torch.tensor([position], device=self.device)
        assert self.cache is not None
        logits = self.model.logits(self.model(ids, pos, self.cache, position))[0]
        self.cached_ids.append(token)
        return logits
