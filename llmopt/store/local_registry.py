"""$LLMOPT_HOME/local.toml: the registry entries of models llmopt made itself
(`llmopt quantize`), so that `llmopt run NAME` finds them. llmopt rewrites this file;
hand-written entries belong in $LLMOPT_HOME/models.toml."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from llmopt.atomic import atomic_file
from llmopt.errors import UsageError
from llmopt.store.registry import LOCAL_REGISTRY

HEADER = "# Models made by llmopt (quantize). Rewritten by llmopt: edit models.toml instead.\n"


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string: same escapes as JSON
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _read(home: Path) -> dict[str, dict[str, Any]]:
    path = home / LOCAL_REGISTRY
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text()).get("models", {})
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path} is not valid TOML ({e}); delete it to start over") from e


def _write(home: Path, models: dict[str, dict[str, Any]]) -> None:
    lines = [HEADER]
    for name, entry in sorted(models.items()):
        lines.append(f"\n[models.{json.dumps(name)}]\n")
        lines += [f"{k} = {_value(v)}\n" for k, v in entry.items() if v is not None]
    with atomic_file(home / LOCAL_REGISTRY) as tmp:
        tmp.write_text("".join(lines))


def register(home: Path, name: str, entry: dict[str, Any]) -> None:
    models = _read(home)
    models[name] = entry
    _write(home, models)


def unregister(home: Path, name: str) -> None:
    models = _read(home)
    if models.pop(name, None) is not None:
        _write(home, models)
