"""Logits to a token: penalties, temperature, top-k, top-p, min-p, then a seeded draw.

The order follows vLLM: penalties on the raw logits, then temperature, then the
truncation filters on the tempered distribution.
"""

from __future__ import annotations

import torch

from llmopt.engine.outputs import TokenLogprob
from llmopt.engine.sampling_params import SamplingParams


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def apply_penalties(
    logits: torch.Tensor,  # (V,) fp32, modified in place
    params: SamplingParams,
    prompt_ids: torch.Tensor,  # (P,) int64 on logits' device
    output_ids: torch.Tensor,  # (N,) int64
) -> None:
    if params.repetition_penalty != 1.0:
        seen = torch.cat([prompt_ids, output_ids]).unique()
        picked = logits[seen]
        # Positive logits shrink, negative ones grow more negative: both less likely.
        logits[seen] = torch.where(
            picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty
        )
    if (params.presence_penalty or params.frequency_penalty) and output_ids.numel():
        counts = torch.bincount(output_ids, minlength=logits.shape[0]).to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Return tempered logits (V,) with tokens outside top-k/top-p/min-p set to -inf."""
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[0]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p; the top one stays.
        drop_sorted = probs.cumsum(-1) - probs >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def greedy_tokens(logits: torch.Tensor) -> list[int]:
    """Each row's most likely token, (M, V) -> M ids: the first maximum, as argmax picks
    it. torch.max along the last dimension gives the same index and, on the CPU, runs
    about 5x faster than argmax (a 32-row step of a 49,152-token vocabulary: 0.9 ms
    against 4.3; argmax's reduction is single-threaded and scalar there)."""
    return logits.max(-1).indices.tolist()


def sample(
    logits: torch.Tensor,  # (V,) fp32 logits of the next token
    params: SamplingParams,
    generator: torch.Generator,
    prompt_ids: torch.Tensor,
    output_ids: torch.Tensor,
) -> int:
    if params.greedy:
        return int(penalized(logits, params, prompt_ids, output_ids).argmax())
    return draw(probabilities(logits, params, prompt_ids, output_ids), generator)


def penalized(
    logits: torch.Tensor, params: SamplingParams, prompt_ids: torch.Tensor, output_ids: torch.Tensor
) -> torch.Tensor:
    """logits (V,) with the penalties applied, in a copy: the caller's stay untouched."""
    if not params.penalized:
        return logits
    logits = logits.clone()
    apply_penalties(logits, params, prompt_ids, output_ids)
    return logits


def probabilities(
    logits: torch.Tensor, params: SamplingParams, prompt_ids: torch.Tensor, output_ids: torch.Tensor
) -> torch.Tensor:
    """The distribution (V,) fp32 that `sample` draws from at temperature > 0."""
    return filter_logits(penalized(logits, params, prompt_ids, output_ids), params).softmax(-1)


def verify_token(
    p: torch.Tensor,  # (V,) the target's distribution at this position
    token: int,  # the drafted token
    q: torch.Tensor | None,  # (V,) the draft's distribution; None: it proposed `token` surely
    generator: torch.Generator,
) -> int | None:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): accept the draft
    with probability min(1, p/q) at its token; None when accepted, else a replacement
    drawn from max(p - q, 0) renormalized. Accepted or replaced, the token that comes out
    is distributed exactly as p."""
    q_token = 1.0 if q is None else float(q[token])
    u = float(torch.rand(1, generator=generator, device=p.device, dtype=torch.float64))
    if u * q_token < float(p[token]):
        return None
    if q is None:
        residual = p.clone()
        residual[token] = 0
    else:
        residual = (p - q).clamp_(min=0)
    if not bool(residual.any()):  # p == q up to rounding: nothing to correct
        return draw(p, generator)
    return draw(residual, generator)


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from probs (V,), by inverting the cumulative distribution at one
    uniform number. torch.multinomial draws an exponential for every entry instead: V
    random numbers a token where this takes one. Zero-probability tokens (filtered) are
    never drawn: the first index whose cumulative sum exceeds u has mass of its own."""
    cdf = probs.double().cumsum(0)  # fp64: no drift over a large vocabulary
    u = torch.rand(1, generator=generator, device=probs.device, dtype=cdf.dtype) * cdf[-1]
    i = int(torch.searchsorted(cdf, u, right=True))
    if i >= probs.shape[0]:  # u rounded up to the total: the last token with mass
        i = int(probs.nonzero()[-1])
    return i


def token_logprob(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """The model's log-probability of `token` from raw logits (V,), and the top k."""
    logprobs = logits.float().log_softmax(-1)
    top = torch.topk(logprobs, k) if k else None
    pairs = list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top else []
    return TokenLogprob(token, float(logprobs[token]), pairs)
