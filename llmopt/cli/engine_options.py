"""EngineConfig's settings as command-line options, mapped in one place.

`@engine_options("device", "dtype", ...)` gives a command those settings as options
(flag, default and help from EngineConfig's fields) and calls it with one
`engine: EngineConfig` built from them, validated there.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from llmopt.engine.config import KV_CACHE_TYPES, PARALLELISM, EngineConfig

F = TypeVar("F", bound=Callable[..., Any])
# What loading a model and sizing its cache take: `run` and `serve` both.
LOADING = (
    "device", "dtype", "max_context", "kv_cache_memory", *KV_CACHE_TYPES, "threads",
    "dequantize", *PARALLELISM,
)  # fmt: skip
_FIELDS = {f.name: f for f in dataclasses.fields(EngineConfig)}
_TYPES = typing.get_type_hints(EngineConfig)


def _option(name: str) -> inspect.Parameter:
    field = _FIELDS[name]
    flag = field.metadata.get("flag")
    if flag is None:
        raise ValueError(f"EngineConfig.{name} has no command-line flag")
    kind = _TYPES[name]
    if isinstance(kind, types.UnionType):  # `int | None`: the default None says optional
        kind = next(t for t in typing.get_args(kind) if t is not type(None))
    option = typer.Option(field.default, flag, help=field.metadata["help"])
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)


def engine_options(*names: str) -> Callable[[F], F]:
    """Add the settings `names` to a command that takes `engine: EngineConfig`."""
    added = [_option(n) for n in names]

    def wrap(command: F) -> F:
        signature = inspect.signature(command)
        own = [p for p in signature.parameters.values() if p.name != "engine"]

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            settings = {n: kwargs.pop(n) for n in names}
            return command(*args, engine=EngineConfig(**settings), **kwargs)

        wrapper.__signature__ = signature.replace(parameters=own + added)  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return wrap
