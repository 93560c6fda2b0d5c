"""What generation hands back to its clients: text deltas and per-request stats."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    queue_s: float = 0.0  # request start to its first scheduled step
    ttft_s: float = 0.0  # request start to first generated token
    total_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)  # gaps between consecutive tokens
    # Speculative decoding: verification rounds, tokens drafted, drafts accepted.
    spec_rounds: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Share of drafted tokens that were accepted."""
        return self.spec_accepted_tokens / self.spec_draft_tokens if self.spec_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verification round produces: its accepted drafts plus the target's."""
        return 1 + self.spec_accepted_tokens / self.spec_rounds if self.spec_rounds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Generation speed after the first token (the steady-state decode rate)."""
        decode_time = sum(self.itl_s)
        return len(self.itl_s) / decode_time if decode_time > 0 else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.ttft_s if self.ttft_s > 0 else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "queue_ms": round(self.queue_s * 1000, 2),
            "ttft_ms": round(self.ttft_s * 1000, 2),
            "total_ms": round(self.total_s * 1000, 2),
            "mean_itl_ms": round(1000 * sum(self.itl_s) / len(self.itl_s), 2) if self.itl_s else 0,
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 2),
        } | self.spec_dict()

    def spec_dict(self) -> dict[str, float | int]:
        """Speculation's counts, where it ran."""
        if not self.spec_rounds:
            return {}
        return {
            "spec_rounds": self.spec_rounds,
            "spec_draft_tokens": self.spec_draft_tokens,
            "spec_accepted_tokens": self.spec_accepted_tokens,
            "spec_acceptance_rate": round(self.acceptance_rate, 4),
            "spec_mean_accepted_length": round(self.mean_accepted_length, 3),
        }


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability and the most likely alternatives at its step."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass
class Delta:
    """A piece of streamed output. The last one has a finish_reason and the stats."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" (EOS or stop string), "length", "abort"
    stats: RequestStats | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token id, when asked for
