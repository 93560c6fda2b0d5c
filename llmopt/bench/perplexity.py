"""`llmopt bench MODEL --perplexity`: perplexity on a held-out text with a sliding
window, the way quantization's cost in quality is reported.

Windows of `window` tokens advance by `stride`; each token is scored once, by the
first window that sees it with the most context (the first window scores all its
tokens). Perplexity = exp(mean negative log-likelihood of the scored tokens).

The default text is the held-out half of `pydoc_data.topics` (llmopt/corpus.py);
quantization calibrates on the other half.

With a reference (the unquantized model), the same windows are scored by both, and the
KL divergence KL(reference || model) of their next-token distributions is averaged over
the scored tokens: a change in perplexity can hide errors that cancel, the divergence
cannot.
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

Logits = Callable[[list[int]], torch.Tensor]  # ids -> next-token logits (T, V)


def perplexity(
    logits_of: Logits, ids: list[int], window: int, stride: int, reference: Logits | None = None
) -> dict[str, Any]:
    """logits_of(ids): next-token logits (T, V) at every position of a text; reference:
    another model's, for its perplexity and the KL divergence from it."""
    if len(ids) < 2:
        raise UsageError("the text is too short to score (fewer than 2 tokens)")
    if not 1 <= stride <= window:
        raise UsageError("--stride must be between 1 and --window")
    t0 = time.perf_counter()
    nll_sum, scored, scored_to = 0.0, 0, 1  # token 0 has no context: never scored
    ref_nll_sum = kl_sum = 0.0
    begin = 0
    while scored_to < len(ids):
        end = min(begin + window, len(ids))
        first = max(0, scored_to - begin - 1)  # the tokens no earlier window scored
        logp = _log_probs(logits_of, ids[begin:end], first)  # (n, V)
        targets = torch.tensor(ids[begin + 1 + first : end], device=logp.device)[:, None]
        nll_sum -= float(logp.gather(1, targets).double().sum())
        if reference is not None:
            ref = _log_probs(reference, ids[begin:end], first).to(logp.device)
            ref_nll_sum -= float(ref.gather(1, targets).double().sum())
            kl_sum += float((ref.exp() * (ref - logp)).sum(-1).double().sum())
        scored += targets.numel()
        scored_to = end
        begin += stride
    out = {
        "perplexity": math.exp(nll_sum / scored),
        "mean_nll": nll_sum / scored,
        "scored_tokens": scored,
        "window": window,
        "stride": stride,
    }
    if reference is not None:
        ref_ppl = math.exp(ref_nll_sum / scored)
        out |= {
            "reference_perplexity": ref_ppl,
            "perplexity_change_pct": 100 * (out["perplexity"] / ref_ppl - 1),
            "kl_divergence": kl_sum / scored,  # nats per token, KL(reference || model)
        }
    return out | {"seconds": time.perf_counter() - t0}


def _log_probs(logits_of: Logits, ids: list[int], first: int) -> torch.Tensor:
    """Log-probabilities (fp32) of the next token at positions first .. len(ids) - 2."""
    return logits_of(ids)[first:-1].float().log_softmax(-1)


def evaluate(
    model: LlamaForCausalLM,
    tokenizer: Tokenizer,
    text: str,
    tokens: int,
    window: int,
    stride: int | None,
    reference: LlamaForCausalLM | None = None,
    kv_types: tuple[str, str] = ("auto", "auto"),
    reference_kv_types: tuple[str, str] = ("auto", "auto"),
) -> dict[str, Any]:
    """Perplexity of the first `tokens` tokens of `text`, the window capped by the
    model's context and the stride defaulting to half the window; with a reference
    model (the same tokenizer; it may be `model` itself over another KV cache type),
    its perplexity and the KL divergence from it. Binds each model to a scoring cache
    of its own (models/scoring.py) of the given (K, V) types."""
    if min(tokens, window) < 2:
        raise UsageError("--ppl-tokens and --window must be at least 2")
    ids = tokenizer.encode(text)[:tokens]
    window = min(window, model.config.max_position_embeddings)
    stride = min(stride or max(1, window // 2), window)
    ref = None if reference is None else Scorer(reference, window, reference_kv_types).logits
    return perplexity(Scorer(model, window, kv_types).logits, ids, window, stride, ref)
