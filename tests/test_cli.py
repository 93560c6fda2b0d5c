"""The command line, driven through Typer's runner: stdout and stderr checked apart."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmopt.cli.main import app
from tests.conftest import REAL_HOME, registry_with

runner = CliRunner()
QUESTION = "What is the capital of France?"
# The default model is SmolLM2's Q4_1 file, run with int8-quantized activations: there
# a change in the last bits of any op flips roundings that compound over 30 layers, and
# on QUESTION its first token is a near tie between "The" and "L" (French follows):
# margins 0.01 to 0.35 with torch's or the native attention kernel, 0.08 in exact fp32
# arithmetic. This phrasing answers "Paris" with a margin of 1.4-1.6 in all three.
ROBUST_QUESTION = "Name the capital of France."


def llmopt(*args: str, input: str | None = None):
    return runner.invoke(app, list(args), input=input)


def test_default_model_answers_paris(monkeypatch) -> None:
    monkeypatch.setenv("LLMOPT_HOME", str(REAL_HOME))  # where `make test` pulled it
    r = llmopt("run", ROBUST_QUESTION, "--temperature", "0", "--max-tokens", "24")
    assert r.exit_code == 0, r.stderr
    assert "Paris" in r.stdout
    assert "time to first token" in r.stderr and "Paris" not in r.stderr


def test_json_output(smollm_folder) -> None:
    r = llmopt(
        "run", str(smollm_folder), QUESTION, "--temperature", "0", "--max-tokens", "3", "--json"
    )
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["completion_tokens"] == 3 and out["finish_reason"] == "length"
    assert out["prompt_tokens"] > 10 and out["ttft_ms"] > 0
    assert isinstance(out["text"], str) and out["text"]


def test_piped_stdin_is_the_prompt(smollm_folder) -> None:
    r = llmopt(
        "run", str(smollm_folder), "--temperature", "0", "--max-tokens", "24", input=QUESTION
    )
    assert r.exit_code == 0, r.stderr
    assert "Paris" in r.stdout


def answer(model: Path, prompt: str, *options: str, max_tokens: int = 20) -> str:
    """`llmopt run MODEL PROMPT --json --max-tokens N OPTIONS...`'s text."""
    r = llmopt("run", str(model), prompt, "--max-tokens", str(max_tokens), "--json", *options)
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)["text"]


def test_same_seed_same_text(smollm_folder) -> None:
    sampled = ("--temperature", "1.0", "--seed")
    a = answer(smollm_folder, "Tell me a story.", *sampled, "11")
    assert answer(smollm_folder, "Tell me a story.", *sampled, "11") == a
    assert answer(smollm_folder, "Tell me a story.", *sampled, "12") != a  # another seed


HOT = ("--temperature", "1.5", "--seed", "3")  # a sample far from greedy, reproducibly


def test_top_k_and_min_p_reach_the_sampler(smollm_folder) -> None:
    """--top-k 1, or --min-p 1, leaves only the likeliest token: at temperature 1.5 the
    answer is then the greedy one, which the same seed without them does not give."""
    greedy = answer(smollm_folder, QUESTION, "--temperature", "0")
    assert answer(smollm_folder, QUESTION, *HOT, "--top-k", "1") == greedy
    assert answer(smollm_folder, QUESTION, *HOT, "--min-p", "1") == greedy
    assert answer(smollm_folder, QUESTION, *HOT) != greedy  # the control


@pytest.mark.parametrize(
    "prompt,penalty",
    [
        ("Count: 1, 2, 3,", ("--frequency-penalty", "2")),
        ("Once upon a time", ("--presence-penalty", "2")),
        ("Count: 1, 2, 3,", ("--repetition-penalty", "1.5")),
    ],
)
def test_penalties_change_a_greedy_answer_that_repeats(smollm_folder, prompt, penalty) -> None:
    """Greedy continues "Count: 1, 2, 3," with " 4, 5, ..., 12," and "Once upon a time"
    with a sentence of several commas; each penalty turns it elsewhere (which way, token
    by token: test_server.py's test_penalties_turn_greedy_away_from_a_repeat)."""
    raw_greedy = ("--raw", "--temperature", "0")
    greedy = answer(smollm_folder, prompt, *raw_greedy, max_tokens=32)
    penalized = answer(smollm_folder, prompt, *raw_greedy, *penalty, max_tokens=32)
    assert penalized != greedy


def test_stop_string_is_not_shown(smollm_folder) -> None:
    r = llmopt(
        "run", str(smollm_folder), QUESTION, "--temperature", "0", "--stop", "Paris", "--json"
    )
    out = json.loads(r.stdout)
    assert out["finish_reason"] == "stop" and "Paris" not in out["text"]


def test_prompt_longer_than_context_is_refused_with_numbers(smollm_folder) -> None:
    r = llmopt("run", str(smollm_folder), "word " * 200, "--ctx-size", "64")
    assert r.exit_code == 5
    assert "context of 64 tokens" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_max_tokens_beyond_context_is_refused(smollm_folder) -> None:
    r = llmopt("run", str(smollm_folder), "Hi", "--ctx-size", "64", "--max-tokens", "100")
    assert r.exit_code == 5 and "max_tokens 100" in r.stderr


def test_unknown_model_lists_known_ones() -> None:
    r = llmopt("run", "no-such-model", "hello")
    assert r.exit_code == 3
    assert "smollm2-135m-instruct" in r.stderr and r.stderr.count("\n") == 1


def test_corrupt_model_file_is_a_clear_error(tmp_path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    r = llmopt("run", str(bad), "hello")
    assert r.exit_code == 4 and "broken.gguf" in r.stderr and "Traceback" not in r.stderr


def test_bad_option_values_are_usage_errors(smollm_folder) -> None:
    r = llmopt("run", str(smollm_folder), "hi", "--top-p", "0")
    assert r.exit_code == 2 and "top_p" in r.stderr
    r = llmopt("run", str(smollm_folder), "hi", "--dtype", "int3")
    assert r.exit_code == 2 and "dtype" in r.stderr


def _local_model(home: Path, tmp_path: Path, sha: str) -> Path:
    src = tmp_path / "weights.gguf"
    src.write_bytes(b"not really a model" * 1000)
    registry_with(
        home,
        f"""
[models.local-test]
format = "gguf"
file = "local.gguf"
sha256 = "{sha}"
sources = [{{ path = "{src}" }}]
""",
    )
    return src


def test_pull_models_rm_round_trip(isolated_home, tmp_path) -> None:
    src = tmp_path / "weights.gguf"
    src.write_bytes(b"x" * 5000)
    _local_model(isolated_home, tmp_path, hashlib.sha256(b"not really a model" * 1000).hexdigest())
    r = llmopt("models")
    assert r.exit_code == 0 and "local-test" not in r.stdout
    r = runner.invoke(app, ["models", "--all"])
    assert "local-test" in r.stdout and "not pulled" in r.stdout
    from rich.console import Console

    from llmopt.store.fetch import pull
    from llmopt.store.store import Store

    path = pull(Store(), "local-test", Console(stderr=True))
    assert path.read_bytes() == b"not really a model" * 1000
    r = llmopt("models")
    assert "local-test" in r.stdout and "18.0 KB" in r.stdout
    r = llmopt("rm", "local-test")
    assert r.exit_code == 0 and not path.exists()
    assert llmopt("rm", "local-test").exit_code == 3


def test_checksum_mismatch_saves_nothing(isolated_home, tmp_path) -> None:
    _local_model(isolated_home, tmp_path, "0" * 64)
    r = llmopt("pull", "local-test")
    assert r.exit_code == 6 and "checksum mismatch" in r.stderr
    folder = isolated_home / "models" / "local-test"
    assert not folder.exists() or not any(folder.iterdir())


@pytest.mark.parametrize("bad", ['[models.x]\nformat = "zip"\n', "not toml = = ="])
def test_bad_registry_is_a_clear_error(isolated_home, bad) -> None:
    registry_with(isolated_home, bad)
    r = llmopt("models")
    assert r.exit_code == 2 and "models.toml" in r.stderr


def test_hub_failure_is_one_clean_line(isolated_home, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # fail fast, never touch the network
    registry_with(
        isolated_home,
        '[models.hub-test]\nformat = "hf"\nsources = [{ hf = "nobody/no-such-model" }]\n',
    )
    r = llmopt("pull", "hub-test")
    assert r.exit_code == 6 and "nobody/no-such-model" in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert not (isolated_home / "models" / "hub-test").exists()


def test_speculative_run_reports_its_drafts(smollm_folder) -> None:
    from tests.conftest import EXTRACTIVE

    plain = answer(smollm_folder, EXTRACTIVE, "--temperature", "0")
    r = llmopt(
        "run", str(smollm_folder), EXTRACTIVE, "--temperature", "0", "--max-tokens", "20",
        "--json", "--speculative", "ngram", "--num-speculative-tokens", "4",
        "--no-speculative-adaptive",
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["text"] == plain
    assert out["spec_draft_tokens"] > 0 and 0 < out["spec_acceptance_rate"] <= 1


def test_bad_speculation_settings_are_one_line_errors(smollm_folder) -> None:
    for options, named in (
        (["--speculative", "draft"], "--draft MODEL"),
        (["--speculative", "medusa"], "--speculative"),
        (["--num-speculative-tokens", "0"], "--num-speculative-tokens"),
    ):
        r = llmopt("run", str(smollm_folder), "hi", *options)
        assert r.exit_code == 2 and named in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = llmopt("run", str(smollm_folder), "hi", "--draft", "no-such-model")
    assert r.exit_code == 3 and "Traceback" not in r.stderr


def _gguf_header(kvs: list[bytes]) -> bytes:
    """A GGUF v3 header without tensors: magic, version, counts, then the key-values."""
    return b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs)


def _gguf_string(s: str) -> bytes:
    return struct.pack("<Q", len(s)) + s.encode()


def test_models_lists_each_architecture_read_from_the_header(tmp_path) -> None:
    """`llmopt models` reads a GGUF's general.architecture past the arrays and numbers
    before it (no gguf package, no tokenizer parse); an unreadable file has none."""
    from llmopt.store.architecture import architecture

    tokens = struct.pack("<IQ", 8, 3) + b"".join(_gguf_string(t) for t in ("a", "bc", "d"))
    kvs = [
        _gguf_string("tokenizer.ggml.tokens") + struct.pack("<I", 9) + tokens,
        _gguf_string("x.scores") + struct.pack("<IIQ", 9, 6, 2) + struct.pack("<2f", 1, 2),
        _gguf_string("x.count") + struct.pack("<II", 4, 7),
        _gguf_string("general.architecture") + struct.pack("<I", 8) + _gguf_string("gemma3"),
    ]
    path = tmp_path / "m.gguf"
    path.write_bytes(_gguf_header(kvs))
    assert architecture(path) == "gemma3"
    path.write_bytes(_gguf_header(kvs[:2]))
    assert architecture(path) is None  # no such key
    path.write_bytes(_gguf_header(kvs)[:40])
    assert architecture(path) is None  # truncated
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "qwen3"}')
    assert architecture(folder) == "qwen3"
