"""Engine output in the OpenAI wire format: whole responses and streamed chunks for
/v1/chat/completions and /v1/completions, with usage and logprobs."""

from __future__ import annotations

import time
import uuid
from typing import Any

from llmopt.engine.outputs import Delta, TokenLogprob
from llmopt.server.generation import ChoiceResult
from llmopt.tokenizer import Tokenizer


def usage(results: list[ChoiceResult], prompts_tokens: list[int]) -> dict[str, Any]:
    """Prompt tokens count once per prompt (not per choice), as OpenAI counts them."""
    prompt = sum(prompts_tokens)
    completion = sum(r.stats.completion_tokens for r in results)
    n = max(1, len(results) // max(1, len(prompts_tokens)))
    cached = sum(r.stats.cached_prompt_tokens for r in results[::n])
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


class Formatter:
    """Shared by both endpoints: ids, timestamps, token strings for logprobs."""

    object_name = ""
    chunk_name = ""
    id_prefix = ""

    def __init__(self, model: str, tokenizer: Tokenizer) -> None:
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.tokenizer = tokenizer

    def _envelope(self, name: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": name,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def usage_chunk(self, u: dict[str, Any]) -> dict[str, Any]:
        return {**self._envelope(self.chunk_name, []), "usage": u}


class ChatFormatter(Formatter):
    object_name = "chat.completion"
    chunk_name = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    def logprobs(self, lps: list[TokenLogprob] | None) -> dict[str, Any] | None:
        if lps is None:
            return None
        content = []
        for lp in lps:
            top = [self._entry(t, v) for t, v in lp.top]
            content.append({**self._entry(lp.token_id, lp.logprob), "top_logprobs": top})
        return {"content": content}

    def role_chunk(self, index: int) -> dict[str, Any]:
        choice = {
            "index": index,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        return self._envelope(self.chunk_name, [choice])

    def chunk(self, index: int, d: Delta, with_logprobs: bool) -> dict[str, Any]:
        choice = {
            "index": index,
            "delta": {"content": d.text} if d.text else {},
            "logprobs": self.logprobs(d.logprobs) if with_logprobs else None,
            "finish_reason": d.finish_reason,
        }
        return self._envelope(self.chunk_name, [choice])

    def response(
        self, results: list[ChoiceResult], u: dict[str, Any], with_logprobs: bool
    ) -> dict[str, Any]:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": r.text},
                "logprobs": self.logprobs(r.logprobs) if with_logprobs else None,
                "finish_reason": r.finish_reason,
            }
            for i, r in enumerate(results)
        ]
        return {**self._envelope(self.object_name, choices), "usage": u}


class CompletionFormatter(Formatter):
    object_name = chunk_name = "text_completion"
    id_prefix = "cmpl"

    def logprobs(self, lps: list[TokenLogprob] | None, offset: int = 0) -> dict[str, Any] | None:
        if lps is None:
            return None
        tokens = [self.token_text(lp.token_id) for lp in lps]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{self.token_text(t): v for t, v in lp.top} for lp in lps],
            "text_offset": offsets,
        }

    def chunk(self, index: int, text: str, d: Delta, with_logprobs: bool) -> dict[str, Any]:
        choice = {
            "index": index,
            "text": text,
            "logprobs": self.logprobs(d.logprobs) if with_logprobs else None,
            "finish_reason": d.finish_reason,
        }
        return self._envelope(self.chunk_name, [choice])

    def response(
        self,
        results: list[ChoiceResult],
        u: dict[str, Any],
        with_logprobs: bool,
        echoes: list[str],
    ) -> dict[str, Any]:
        choices = [
            {
                "index": i,
                "text": echoes[i] + r.text,
                "logprobs": self.logprobs(r.logprobs, len(echoes[i])) if with_logprobs else None,
                "finish_reason": r.finish_reason,
            }
            for i, r in enumerate(results)
        ]
        return {**self._envelope(self.object_name, choices), "usage": u}
