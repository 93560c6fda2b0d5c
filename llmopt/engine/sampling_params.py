"""What a request asks of generation, validated once on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmopt.errors import UsageError


@dataclass(frozen=True)
class SamplingParams:
    """Decoding options, with the meanings the OpenAI API and vLLM give them.

    temperature 0 is greedy. top_k 0 (or -1) and top_p 1 and min_p 0 disable those
    filters. repetition_penalty (1 = off) scales the logits of every token already
    in the prompt or output; presence and frequency penalties subtract from the
    logits of generated tokens. max_tokens None means "until EOS or the context is full".
    logprobs None returns none; k >= 0 returns each generated token's log-probability
    under the model (before penalties and temperature) and the k most likely ones.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        # Accept a list or a single string for convenience; store a tuple.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= -1, "top_k must be >= 0 (0 or -1 disables it)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens must be >= 1"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        """Whether sampling needs the token history (any penalty set)."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )
