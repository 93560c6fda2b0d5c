"""Helpers that several subcommands share."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from llmopt.engine.outputs import RequestStats


def format_stats(s: RequestStats) -> str:
    """One request's timings, as `run` and the chat's /stats print them, and what
    speculative decoding achieved where it ran."""
    timings = (
        f"{s.prompt_tokens} prompt tokens ({s.cached_prompt_tokens} reused from cache), "
        f"{s.completion_tokens} generated; "
        f"time to first token {s.ttft_s * 1000:.0f} ms ({s.prefill_tokens_per_s:.0f} tok/s), "
        f"decode {s.decode_tokens_per_s:.1f} tok/s"
    )
    return f"{timings}; {format_spec(s)}" if s.spec_rounds else timings


def format_spec(s: RequestStats) -> str:
    """Speculative decoding's figures over the counts in `s` (one request's, or a sum)."""
    return (
        f"speculation: acceptance rate {s.acceptance_rate:.0%} ({s.spec_accepted_tokens} of "
        f"{s.spec_draft_tokens} drafted tokens), mean accepted length {s.mean_accepted_length:.2f}"
    )


def emit_json(result: dict[str, Any], as_json: bool, output: Path | None) -> None:
    """One result object as JSON: to --output (atomically) and/or stdout."""
    from llmopt.bench.report import write

    text = json.dumps(result, indent=2) + "\n"
    if output is not None:
        write(output, text)
    if as_json:
        sys.stdout.write(text)
