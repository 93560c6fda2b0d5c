"""`llmopt bench MODEL --perplexity`: perplexity on a held-out text with a sliding
window, the way quantization's cost in quality is reported.

Windows of `window` tokens advance by `stride`; each token is scored once, by the
first window that sees it with the most context (the first window scores all its
tokens). Perplexity = exp(mean negative log-likelihood of the scored tokens).

The default text is the held-out half of `pydoc_data.topics` (llmopt/corpus.py);
quantization calibrates on the other half.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from llmopt.errors import UsageError
from llmopt.models.llama import LlamaForCausalLM
from llmopt.models.scoring import Scorer
from llmopt.tokenizer import Tokenizer


def perplexity(
    logits_of: Callable[[list[int]], torch.Tensor], ids: list[int], window: int, stride: int
) -> dict[str, Any]:
    """logits_of(ids): next-token logits (T, V) at every position of a text."""
    if len(ids) < 2:
        raise UsageError("the text is too short to score (fewer than 2 tokens)")
    if not 1 <= stride <= window:
        raise UsageError("--stride must be between 1 and --window")
    t0 = time.perf_counter()
    nll_sum, scored, scored_to = 0.0, 0, 1  # token 0 has no context: never scored
    begin = 0
    while scored_to < len(ids):
        end = min(begin + window, len(ids))
        logits = logits_of(ids[begin:end])  # (T, V): position t predicts t + 1
        targets = torch.tensor(ids[begin + 1 : end], device=logits.device)
        nll = -logits[:-1].log_softmax(-1).gather(1, targets[:, None])[:, 0]  # (T - 1,)
        new = nll[max(0, scored_to - begin - 1) :]  # the tokens no earlier window scored
        nll_sum += float(new.double().sum())
        scored += new.numel()
        scored_to = end
        begin += stride
    return {
        "perplexity": math.exp(nll_sum / scored),
        "mean_nll": nll_sum / scored,
        "scored_tokens": scored,
        "window": window,
        "stride": stride,
        "seconds": time.perf_counter() - t0,
    }


def evaluate(
    model: LlamaForCausalLM,
    tokenizer: Tokenizer,
    text: str,
    tokens: int,
    window: int,
    stride: int | None,
) -> dict[str, Any]:
    """Perplexity of the first `tokens` tokens of `text`, the window capped by the
    model's context and the stride defaulting to half the window. Binds the model to a
    scoring cache of its own (models/scoring.py)."""
    if min(tokens, window) < 2:
        raise UsageError("--ppl-tokens and --window must be at least 2")
    ids = tokenizer.encode(text)[:tokens]
    window = min(window, model.config.max_position_embeddings)
    stride = min(stride or max(1, window // 2), window)
    return perplexity(Scorer(model, window).logits, ids, window, stride)
