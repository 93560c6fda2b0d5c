"""Forward passes over whole texts outside any engine: a model bound to a KV cache of
its own, sized for one window, for scoring (perplexity, parity) and calibration.

Each call prefills one text from position 0 into slots 0 .. T-1 of that cache, so no
scheduler or block manager is involved; the kernels are those the model chooses for
the cache (models/kernel_choice.py), as in serving.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from llmopt.errors import ContextLengthError
from llmopt.layers.attention_metadata import AttentionMetadata, PrefillChunk
from llmopt.layers.kv_cache import PagedKVCache
from llmopt.models.llama import LlamaForCausalLM

BLOCK_SIZE = 16


class PrefillInputs(NamedTuple):
    input_ids: torch.Tensor  # (T,)
    positions: torch.Tensor  # (T,) 0 .. T-1
    meta: AttentionMetadata


class Scorer:
    """Runs texts of up to `max_tokens` tokens through `model` (which it binds to a
    cache of its own; bind it elsewhere and this scorer no longer applies)."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        max_tokens: int,
        kv_types: tuple[str, str] = ("auto", "auto"),  # the cache's K and V types
    ) -> None:
        cfg = model.config
        p = next(model.parameters())
        self.model = model
        self.max_tokens = min(max_tokens, cfg.max_position_embeddings)
        blocks = -(-self.max_tokens // BLOCK_SIZE)
        self.cache = PagedKVCache.for_model(cfg, blocks, BLOCK_SIZE, p.dtype, p.device, kv_types)
        model.bind_cache(self.cache)

    def inputs(self, token_ids: list[int]) -> PrefillInputs:
        """The model's inputs for one prefill of the whole text (its keys go to slots
        0 .. T-1, so every text of the same length has the same metadata)."""
        n = len(token_ids)
        if not 1 <= n <= self.max_tokens:
            raise ContextLengthError(
                f"{n} tokens to score; this scorer holds 1 to {self.max_tokens}"
            )
        device = self.cache.device
        slots = torch.arange(n, device=device)
        meta = AttentionMetadata(slots, None, [PrefillChunk(0, n, 0, 0, slots, 0)])
        ids = torch.tensor(token_ids, device=device)
        return PrefillInputs(ids, torch.arange(n, device=device), meta)

    @torch.inference_mode()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Next-token logits (T, V) fp32 at every position of one text."""
        inputs = self.inputs(token_ids)
        if self.model.cache is not self.cache:  # an engine's runner used the model since
            self.model.bind_cache(self.cache)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta)
        return self.model.logits(hidden)
