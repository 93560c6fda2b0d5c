"""The interactive chat: history, slash commands, Ctrl-C handling."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import torch
from rich.console import Console

from llmopt.cli.chat import Chat
from llmopt.engine.config import EngineConfig
from llmopt.engine.engine import Engine
from llmopt.engine.factory import build_engine
from llmopt.engine.runner import Runner
from llmopt.engine.sampling_params import SamplingParams
from llmopt.loader.load import load_model
from llmopt.store.store import Store
from tests.conftest import EXTRACTIVE


@pytest.fixture(scope="module")
def loaded(smollm_folder):
    return load_model(
        smollm_folder, torch.bfloat16, torch.device("cpu"), Store(), Console(stderr=True)
    )


@pytest.fixture(scope="module")
def engine(loaded) -> Engine:
    return build_engine(loaded, EngineConfig(max_context=2048, kv_cache_memory=0.05))


def scripted(monkeypatch, lines: list[str]) -> None:
    it: Iterator[str] = iter(lines)

    def fake_input(prompt: str = "") -> str:
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)


def test_chat_session(engine, monkeypatch, capsys) -> None:
    chat = Chat(engine, "smollm", SamplingParams(), None, Console(stderr=True))
    scripted(
        monkeypatch,
        [
            "/set temperature 0",
            "/set max_tokens 24",
            "What is the capital of France?",
            "/stats",
            '"""',
            "Repeat the city's name,",
            "once.",
            '"""',
            "/clear",
            "/exit",
            "never read",
        ],
    )
    chat.repl()
    out = capsys.readouterr()
    assert "Paris" in out.out
    assert "time to first token" in out.err
    assert "speculation" not in out.err  # none ran
    # the start-up line states the memory: the model's and the process's
    held = re.search(r"weights and KV\s+cache\s+(\d+)\s+MB,\s+resident\s+(\d+)\s+MB", out.err)
    assert held and 0 < int(held.group(1)) < int(held.group(2))
    assert chat.params.temperature == 0 and chat.params.max_tokens == 24
    assert chat.history == []  # /clear ran after two exchanges


def test_stats_show_what_speculation_achieved(loaded, monkeypatch, capsys):
    """/stats of an answer drafted by prompt lookup: its acceptance rate and mean
    accepted length (tokens a verification round produced)."""
    config = EngineConfig(
        max_context=2048, kv_cache_memory=0.05, speculative="ngram", speculative_adaptive=False
    )
    params = SamplingParams(temperature=0, max_tokens=24)
    chat = Chat(build_engine(loaded, config), "smollm", params, None, Console(stderr=True))
    scripted(monkeypatch, [EXTRACTIVE, "/stats"])
    chat.repl()
    s = chat.last_stats
    assert s is not None and s.spec_rounds > 0 and s.spec_accepted_tokens > 0
    err = " ".join(capsys.readouterr().err.split())  # as one line, however rich wrapped it
    assert f"acceptance rate {s.acceptance_rate:.0%} " in err
    assert f"({s.spec_accepted_tokens} of {s.spec_draft_tokens} drafted tokens)" in err
    assert f"mean accepted length {s.mean_accepted_length:.2f}" in err


def test_history_is_sent_with_each_turn(engine, monkeypatch) -> None:
    chat = Chat(
        engine,
        "smollm",
        SamplingParams(temperature=0, max_tokens=8),
        "Be brief.",
        Console(stderr=True),
    )
    chat.ask("My name is Ada.")
    assert [m["role"] for m in chat.history] == ["user", "assistant"]
    text = engine.tokenizer.decode(chat.prompt_ids("What is my name?"))
    assert "Be brief." in text and "My name is Ada." in text


def test_bad_set_reports_and_keeps_chatting(engine, monkeypatch, capsys) -> None:
    chat = Chat(engine, "smollm", SamplingParams(), None, Console(stderr=True))
    scripted(monkeypatch, ["/set top_p 7", "/set temperature warm", "/set bogus 1", "/nope"])
    chat.repl()
    err = capsys.readouterr().err
    assert "top_p must be in (0, 1]" in err and "takes a number" in err
    assert "usage: /set" in err and "unknown command" in err


def test_cancel_ends_the_answer_cleanly(engine) -> None:
    calls = {"n": 0}

    def cancelled() -> bool:
        calls["n"] += 1
        return calls["n"] >= 3

    deltas = list(
        engine.generate(
            engine.tokenizer.encode("Tell me a long story."),
            SamplingParams(temperature=0, ignore_eos=True),
            cancelled,
        )
    )
    assert deltas[-1].finish_reason == "abort"
    # Polled before each step: two steps ran (two tokens), the third poll aborted.
    assert deltas[-1].stats is not None and deltas[-1].stats.completion_tokens == 2
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks  # freed at once


def test_next_turn_reuses_cached_prefix_and_answers_the_same(engine) -> None:
    params = SamplingParams(temperature=0, max_tokens=16)
    chat = Chat(engine, "smollm", params, None, Console(stderr=True))
    chat.ask("Name a color.")
    first = chat.last_stats
    chat.ask("Name another one.")
    second = chat.last_stats
    assert first is not None and second is not None
    # The whole first exchange (prompt and answer) is already in the KV cache.
    assert second.cached_prompt_tokens >= first.prompt_tokens + first.completion_tokens - 2
    # Reusing the cache changes nothing in the answer: a fresh engine agrees.
    runner = Runner(engine.runner.model, 64, 16)
    fresh = Engine(runner, engine.tokenizer, engine.eos_ids, 2048, EngineConfig())
    replay = Chat(fresh, "smollm", params, None, Console(stderr=True))
    replay.history = chat.history[:2]
    prompt = replay.prompt_ids("Name another one.")
    expected = "".join(d.text for d in fresh.generate(prompt, params))
    assert chat.history[-1]["content"] == expected
