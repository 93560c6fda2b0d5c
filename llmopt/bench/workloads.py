"""What a serving benchmark sends: lists of conversations, each one or more turns.

- random: prompts of random words, input and output lengths drawn from ranges,
  generated to the full output length (ignore_eos), as `vllm bench serve` does;
- shared-prefix: N long system prompts x M short questions, the case a global
  prefix cache is for;
- chat: one request per line of a JSONL file of {"messages": [...]};
- multi-turn: conversations whose every turn resends the history plus the answers.

Lengths are in words chosen to be one token each in common BPE vocabularies; the
token counts reported come from the server's usage, not from this estimate.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from llmopt.errors import UsageError

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "her",
    "an",
    "are",
    "were",
    "be",
    "this",
    "which",
    "or",
    "had",
    "not",
    "but",
    "have",
    "one",
    "all",
    "their",
    "they",
    "there",
    "been",
    "has",
    "more",
    "time",
    "new",
    "would",
    "who",
    "will",
    "if",
    "about",
    "up",
    "out",
    "so",
    "can",
    "when",
    "no",
    "what",
    "into",
    "some",
    "than",
    "them",
    "only",
    "other",
    "its",
    "may",
    "over",
    "very",
    "after",
    "first",
    "two",
    "most",
    "also",
    "made",
    "such",
    "years",
    "where",
    "many",
    "city",
    "way",
    "well",
    "day",
    "world",
    "way",
    "long",
    "life",
    "part",
    "back",
    "house",
    "water",
    "three",
    "just",
    "people",
    "state",
    "see",
    "work",
    "year",
    "under",
    "school",
    "great",
    "small",
    "place",
    "since",
    "old",
    "end",
    "how",
    "each",
    "down",
    "high",
    "still",
    "any",
    "name",
    "both",
    "same",
    "last",
    "own",
    "case",
    "family",
    "night",
    "point",
    "power",
    "game",
    "line",
    "music",
    "river",
    "book",
    "home",
    "town",
    "war",
    "early",
    "white",
]


@dataclass
class Turn:
    """One request: the new user message (history is prepended for later turns)."""

    content: str
    max_tokens: int


@dataclass
class Conversation:
    turns: list[Turn]
    system: str | None = None
    ignore_eos: bool = False
    history: list[dict[str, str]] = field(default_factory=list)  # from a chat file


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _length(rng: random.Random, mean: int, range_ratio: float) -> int:
    """Uniform in [mean*(1-r), mean*(1+r)], at least 1 (vLLM's --random-range-ratio)."""
    lo, hi = max(1, round(mean * (1 - range_ratio))), max(1, round(mean * (1 + range_ratio)))
    return rng.randint(lo, hi)


def random_workload(
    num: int, input_len: int, output_len: int, range_ratio: float, seed: int
) -> list[Conversation]:
    rng = random.Random(seed)
    return [
        Conversation(
            [
                Turn(
                    _words(rng, _length(rng, input_len, range_ratio)),
                    _length(rng, output_len, range_ratio),
                )
            ],
            ignore_eos=True,
        )
        for _ in range(num)
    ]


def shared_prefix_workload(
    num_prefixes: int,
    questions_per_prefix: int,
    prefix_len: int,
    question_len: int,
    output_len: int,
    seed: int,
) -> list[Conversation]:
    """Requests interleaved across prefixes, so that every prefix is in use at once."""
    rng = random.Random(seed)
    systems = [f"Context {i}: " + _words(rng, prefix_len) for i in range(num_prefixes)]
    return [
        Conversation([Turn(_words(rng, question_len) + "?", output_len)], systems[p], True)
        for _ in range(questions_per_prefix)
        for p in range(num_prefixes)
    ]


def multi_turn_workload(
    num: int, turns: int, input_len: int, output_len: int, seed: int
) -> list[Conversation]:
    rng = random.Random(seed)
    return [
        Conversation(
            [Turn(_words(rng, input_len), output_len) for _ in range(turns)], ignore_eos=True
        )
        for _ in range(num)
    ]


def chat_file_workload(path: Path, output_len: int, limit: int | None) -> list[Conversation]:
    """Each line: {"messages": [...], "max_tokens"?: int}; the last message is the turn."""
    out = []
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            messages = row["messages"]
            last = messages[-1]
            assert last["role"] == "user" and isinstance(last["content"], str)
        except (ValueError, KeyError, IndexError, TypeError, AssertionError):
            raise UsageError(
                f'{path}:{n}: expected {{"messages": [..., {{"role": "user", "content": "..."}}]}}'
            ) from None
        turn = Turn(last["content"], int(row.get("max_tokens", output_len)))
        out.append(Conversation([turn], history=messages[:-1]))
        if limit is not None and len(out) == limit:
            break
    if not out:
        raise UsageError(f"{path} holds no conversations")
    return out
