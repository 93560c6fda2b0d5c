"""The models.toml registry: which models llmopt knows by name and where to get them."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmopt.errors import ModelNotFoundError, UsageError

FORMATS = ("gguf", "hf")
SOURCE_KINDS = ("pypi", "hf", "path", "local", "parts")
PART_KINDS = ("pypi", "path")  # the sources a part of a split file may come from
LOCAL_REGISTRY = "local.toml"  # models llmopt made (quantize), in $LLMOPT_HOME


@dataclass(frozen=True)
class Source:
    # "pypi" | "hf" | "path" (copied into the store) | "local" (used in place) | "parts"
    # (a file split in pieces, each from a pypi or path source, joined in order)
    kind: str
    ref: str  # package spec, repo id, or filesystem path ("" for parts)
    member: str | None = None  # file inside a wheel, or a single file of a hub repo
    parts: tuple[Source, ...] = ()

    @classmethod
    def parse(cls, raw: dict[str, Any], model: str) -> Source:
        kinds = [k for k in SOURCE_KINDS if k in raw]
        if len(kinds) != 1:
            raise UsageError(
                f"models.toml: a source of '{model}' needs one of {', '.join(SOURCE_KINDS)}"
            )
        kind = kinds[0]
        if kind == "parts":
            parts = tuple(cls.parse(p, model) for p in raw["parts"])
            if not parts or any(p.kind not in PART_KINDS for p in parts):
                raise UsageError(
                    f"models.toml: the parts of '{model}' must each be one of "
                    f"{', '.join(PART_KINDS)}"
                )
            return cls(kind, "", parts=parts)
        return cls(kind, str(raw[kind]), raw.get("member") or raw.get("file"))

    @property
    def local(self) -> bool:
        return self.kind == "local"

    def describe(self) -> str:
        if self.parts:
            return f"{len(self.parts)} parts (" + " + ".join(p.describe() for p in self.parts) + ")"
        return f"{self.kind}:{self.ref}" + (f" ({self.member})" if self.member else "")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    format: str
    sources: tuple[Source, ...]
    file: str | None = None  # file name in the store, for single-file formats
    sha256: str | None = None
    size: int | None = None
    quantization: str | None = None
    license: str | None = None
    description: str = ""

    @property
    def local_source(self) -> Path | None:
        """Where a model llmopt made lives: used in place, never copied."""
        local = [s for s in self.sources if s.local]
        return Path(local[0].ref).expanduser() if local else None

    @classmethod
    def parse(cls, name: str, raw: dict[str, Any]) -> ModelEntry:
        fmt = raw.get("format")
        if fmt not in FORMATS:
            raise UsageError(f"models.toml: '{name}' has format {fmt!r}; use one of {FORMATS}")
        if fmt == "gguf" and not raw.get("file"):
            raise UsageError(f"models.toml: '{name}' is a GGUF model and needs a 'file' name")
        sources = tuple(Source.parse(s, name) for s in raw.get("sources", []))
        if any(s.parts for s in sources) and not (raw.get("file") and raw.get("sha256")):
            # One file; parts joined in the wrong order or from the wrong versions would
            # otherwise go unnoticed.
            raise UsageError(
                f"models.toml: '{name}' comes in parts and needs a 'file' name and its sha256"
            )
        return cls(
            name=name,
            format=fmt,
            sources=sources,
            file=raw.get("file"),
            sha256=raw.get("sha256"),
            size=raw.get("size"),
            quantization=raw.get("quantization"),
            license=raw.get("license"),
            description=raw.get("description", ""),
        )


def _registry_files(home: Path) -> list[Path]:
    """The shipped registry, the models llmopt made ($LLMOPT_HOME/local.toml), then the
    user's own ($LLMOPT_HOME/models.toml) on top."""
    env = os.environ.get("LLMOPT_REGISTRY")
    shipped = Path(env) if env else Path(__file__).resolve().parents[2] / "models.toml"
    files = (shipped, home / LOCAL_REGISTRY, home / "models.toml")
    return [p for p in files if p.is_file()]


@dataclass
class Registry:
    models: dict[str, ModelEntry]
    default: str | None

    @classmethod
    def load(cls, home: Path) -> Registry:
        models: dict[str, ModelEntry] = {}
        default = None
        for path in _registry_files(home):
            try:
                raw = tomllib.loads(path.read_text())
            except tomllib.TOMLDecodeError as e:
                raise UsageError(f"{path} is not valid TOML: {e}") from e
            default = raw.get("default", default)
            for name, entry in raw.get("models", {}).items():
                models[name] = ModelEntry.parse(name, entry)
        return cls(models, default)

    def get(self, name: str) -> ModelEntry:
        try:
            return self.models[name]
        except KeyError:
            known = ", ".join(sorted(self.models)) or "(none: models.toml is missing)"
            raise ModelNotFoundError(
                f"unknown model '{name}'; known models: {known} (or give a path to a "
                ".gguf file or a Hugging Face folder)"
            ) from None

    def default_name(self) -> str:
        if not self.default:
            raise UsageError("no default model in models.toml; name one: llmopt run NAME")
        return self.default
