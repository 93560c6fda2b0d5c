"""Helpers that several subcommands share."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from llmopt.engine.outputs import RequestStats


def format_stats(s: RequestStats) -> str:
    """One request's timings, as `run` and the chat's /stats print them."""
    return (
        f"{s.prompt_tokens} prompt tokens ({s.cached_prompt_tokens} reused from cache), "
        f"{s.completion_tokens} generated; "
        f"time to first token {s.ttft_s * 1000:.0f} ms ({s.prefill_tokens_per_s:.0f} tok/s), "
        f"decode {s.decode_tokens_per_s:.1f} tok/s"
    )


def emit_json(result: dict[str, Any], as_json: bool, output: Path | None) -> None:
    """One result object as JSON: to --output (atomically) and/or stdout."""
    from llmopt.bench.report import write

    text = json.dumps(result, indent=2) + "\n"
    if output is not None:
        write(output, text)
    if as_json:
        sys.stdout.write(text)
