"""EngineConfig: one declaration per setting, validated once with the flag named, and
the CLI's flags mapped onto it in one place."""

from __future__ import annotations

import dataclasses

import pytest
from typer.testing import CliRunner

from llmopt.cli.main import app
from llmopt.engine.config import EngineConfig
from llmopt.errors import UsageError

FIELDS = {f.name: f for f in dataclasses.fields(EngineConfig)}


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"max_num_seqs": 0}, "--max-num-seqs must be at least 1, not 0"),
        ({"max_num_batched_tokens": -1}, "--max-num-batched-tokens must be at least 1"),
        ({"max_context": 0}, "--ctx-size must be positive"),
        ({"kv_cache_memory": 0.0}, "--kv-cache-memory must be a positive number of GB"),
        ({"threads": 0}, "--threads must be at least 1"),
        ({"batching": "eager"}, "--batching must be one of continuous, dynamic, static"),
        ({"block_size": 0}, "block_size must be positive"),  # no flag: the field's name
        ({"device": "tpu"}, "unknown device 'tpu'"),
        ({"dtype": "int3"}, "unknown dtype 'int3'"),
    ],
)
def test_bad_settings_are_refused_naming_the_setting(settings, message) -> None:
    with pytest.raises(UsageError, match=message):
        EngineConfig(**settings)


def test_defaults_are_valid_and_single_stream_engines_are_not_batched() -> None:
    config = EngineConfig()
    assert config.batched and config.max_num_batched_tokens == 512
    assert not config.replace(max_num_seqs=1).batched


def _flags(command: str) -> list[str]:
    """Every option string the command declares, as click sees it."""
    import typer.main

    cmd = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    return [opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)]


@pytest.mark.parametrize(
    "command,settings",
    [
        ("run", ["device", "dtype", "max_context", "kv_cache_memory", "threads", "dequantize"]),
        (
            "serve",
            ["device", "max_num_seqs", "max_num_batched_tokens", "batching", "prefix_cache"],
        ),
        ("bench", ["device", "dtype", "threads", "dequantize"]),
        *(
            (command, ["kv_cache_dtype", "k_cache_dtype", "v_cache_dtype"])
            for command in ("run", "serve", "bench")
        ),
        ("quantize", ["device", "threads"]),
    ],
)
def test_each_command_shows_each_setting_flag_once(command, settings) -> None:
    flags = _flags(command)
    for name in settings:
        flag = FIELDS[name].metadata["flag"].partition("/")[0]
        assert flags.count(flag) == 1, (command, flag)


def test_a_bad_flag_value_is_one_line_before_any_loading(tmp_path) -> None:
    r = CliRunner().invoke(app, ["serve", str(tmp_path / "none"), "--max-num-seqs", "0"])
    assert r.exit_code == 2
    assert r.stderr.strip() == "error: --max-num-seqs must be at least 1, not 0"
