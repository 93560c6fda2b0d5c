"""What the router reads of a request body, without validating it (the replica does):
the model, the prompt as text for the prefix index, and an estimate of its tokens."""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from llmopt.openai_wire import APIError
from llmopt.router.prefix_index import PrefixIndex
from llmopt.router.state import RouteRequest

CHARS_PER_TOKEN = 4  # rough English average; the router has no tokenizer
DEFAULT_MAX_TOKENS = 256  # for outstanding-token counts when the client sets no limit


class RequestView(NamedTuple):
    model: str | None
    prompt: str
    tokens: int


def _prompt_text(path: str, body: dict[str, Any]) -> str:
    if path.endswith("/chat/completions"):
        parts = []
        for m in body.get("messages") or []:
            if isinstance(m, dict):
                content = m.get("content")
                text = content if isinstance(content, str) else json.dumps(content)
                parts.append(f"{m.get('role')}: {text}\n")
        return "".join(parts)
    prompt = body.get("prompt", "")
    return prompt if isinstance(prompt, str) else json.dumps(prompt)


def read_request(path: str, raw: bytes) -> RequestView:
    """The view of a POST body; a 400 in the OpenAI shape if it is not a JSON object."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise APIError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "model: must be a string", param="model")
    prompt = _prompt_text(path, body)
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    answer = limit if isinstance(limit, int) and limit > 0 else DEFAULT_MAX_TOKENS
    return RequestView(model, prompt, len(prompt) // CHARS_PER_TOKEN + answer)


def route_for(view: RequestView, index: PrefixIndex) -> tuple[RouteRequest, list[int]]:
    """The request as a policy sees it, and its prompt's keys in the prefix index (to
    record where it went). The model leads the text: equal prompts to two models share
    no cached prefix. Every driver of the policies (the router, the Ray Serve request
    router) builds its requests here."""
    keys = index.keys(f"{view.model}\n{view.prompt}")
    return RouteRequest(view.model, view.tokens, index.match(keys)), keys
