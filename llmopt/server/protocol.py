"""The OpenAI request bodies we accept, validated by pydantic, and their translation
into engine terms (token ids, SamplingParams).

Fields OpenAI defines and we cannot honour (tools, images, logit_bias, suffix, ...)
are refused with a 400 naming the field; they are never silently ignored. Fields
we do not know at all are ignored, as the OpenAI API does, so that newer clients
keep working. Our extra sampling fields (top_k, min_p, repetition_penalty,
ignore_eos) follow vLLM's names; `cache: false` opts one request out of the
response caches.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmopt.engine.sampling_params import SamplingParams
from llmopt.openai_wire import APIError

MAX_N = 16  # choices per request: each is a request in the engine
ROLES = {"system", "user", "assistant", "developer"}


class StreamOptions(BaseModel):
    include_usage: bool = False


class TextPart(BaseModel):
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[TextPart] | None = None

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role == "tool":
            raise ValueError("tool messages are not supported (no tool calling)")
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(sorted(ROLES))}")
        return role

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = self.content or []
        for p in parts:
            if p.type != "text" or p.text is None:
                raise APIError(400, f"content parts of type '{p.type}' are not supported")
        return "".join(p.text or "" for p in parts)


class _Common(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    max_tokens: int | None = Field(None, ge=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    seed: int | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM-style extras
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    ignore_eos: bool = False
    cache: bool = True  # False: skip the response caches for this request

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stop

    def refuse_unsupported(self) -> None:
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")

    def sampling(
        self, max_tokens: int | None, logprobs: int | None, seed_offset: int
    ) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        # Each of n choices gets its own seed, so that n > 1 with a seed gives n
        # different (and reproducible) samples.
        seed = None if self.seed is None else self.seed + seed_offset
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            max_tokens=max_tokens,
            seed=seed,
            stop=tuple(stop),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
        )

    @property
    def deterministic(self) -> bool:
        """Same request, same answer: the only requests a response cache may serve."""
        return self.temperature == 0 or self.seed is not None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def cache_params(self) -> dict[str, Any]:
        """What, besides the prompt, decides the answer (so belongs in a cache key)."""
        skip = {"model", "messages", "prompt", "stream", "stream_options", "user", "cache"}
        return self.model_dump(exclude=skip)


class ChatCompletionRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools:
            raise APIError(400, "tools are not supported", param="tools")
        if self.tool_choice not in (None, "none"):
            raise APIError(400, "tool_choice is not supported", param="tool_choice")
        if self.response_format and self.response_format.get("type") != "text":
            raise APIError(400, "only response_format type 'text' is supported", "response_format")
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def chat_messages(self) -> list[dict[str, str]]:
        """Messages as the chat template wants them ('developer' is OpenAI's 'system')."""
        out = []
        for m in self.messages:
            role = "system" if m.role == "developer" else m.role
            out.append({"role": role, "content": m.text()})
        return out


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # the legacy API's default
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if self.best_of not in (None, self.n):
            raise APIError(400, "best_of is not supported", param="best_of")

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


def cache_key_text(payload: Any) -> str:
    """A canonical JSON string: equal for requests that must get the same answer."""
    return json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


Endpoint = Literal["chat", "completion"]
