"""The local model store under $LLMOPT_HOME (default ~/.cache/llmopt).

Layout:
  models/NAME/FILE          a pulled single-file model (GGUF)
  models/NAME/...           a pulled Hugging Face folder
  converted/KEY/            a GGUF converted to a Hugging Face folder (fp32 safetensors),
                            keyed by the GGUF's path, size and mtime
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from llmopt.errors import ModelNotFoundError
from llmopt.home import llmopt_home
from llmopt.store.registry import ModelEntry, Registry


@dataclass(frozen=True)
class StoredModel:
    name: str
    format: str
    quantization: str | None
    path: Path
    size: int


def _tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Store:
    def __init__(self, home: Path | None = None) -> None:
        self.home = home or llmopt_home()
        self.registry = Registry.load(self.home)

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    def model_dir(self, name: str) -> Path:
        return self.models_dir / name

    def local_path(self, entry: ModelEntry) -> Path:
        """Where the model lives once pulled: the file for GGUF, the folder for HF."""
        if entry.local_source is not None:
            return entry.local_source
        d = self.model_dir(entry.name)
        return d / entry.file if entry.file else d

    def is_pulled(self, entry: ModelEntry) -> bool:
        p = self.local_path(entry)
        return p.is_file() if entry.file else (p / "config.json").is_file()

    def list(self) -> list[StoredModel]:
        out = []
        for name, entry in sorted(self.registry.models.items()):
            if self.is_pulled(entry):
                path = self.local_path(entry)
                out.append(
                    StoredModel(name, entry.format, entry.quantization, path, _tree_size(path))
                )
        return out

    def remove(self, name: str) -> Path:
        entry = self.registry.get(name)
        if entry.local_source is not None:
            return self._remove_local(entry, entry.local_source)
        d = self.model_dir(name)
        if not d.exists():
            raise ModelNotFoundError(f"'{name}' is not in the store ({self.models_dir})")
        target = self.local_path(entry)
        if target.is_file():
            shutil.rmtree(self.converted_dir(target), ignore_errors=True)
        shutil.rmtree(d)
        return d

    def _remove_local(self, entry: ModelEntry, path: Path) -> Path:
        """A model llmopt made: delete its file or folder and its registry entry."""
        from llmopt.store.local_registry import unregister

        if path.is_file():
            shutil.rmtree(self.converted_dir(path), ignore_errors=True)
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
        unregister(self.home, entry.name)
        return path

    def converted_dir(self, gguf: Path) -> Path:
        """The conversion cache of a GGUF file; a changed file gets a new key."""
        st = gguf.stat()
        key = f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        return self.home / "converted" / f"{gguf.stem}-{digest}"
