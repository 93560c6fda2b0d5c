"""The package layering (scripts/check_layers.py): the real tree has no upward or
sideways import, and the checker does flag one."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def check_layers() -> ModuleType:
    # scripts/ is not a package: load the checker from its file
    spec = importlib.util.spec_from_file_location("check_layers", REPO / "scripts/check_layers.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, source in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return root


def test_real_tree_has_no_upward_or_sideways_import(check_layers: ModuleType) -> None:
    assert check_layers.violations(REPO) == []


def test_checker_flags_upward_peer_and_unplaced_imports(
    check_layers: ModuleType, tmp_path: Path
) -> None:
    root = _tree(
        tmp_path,
        {
            "llmopt/__init__.py": "",
            "llmopt/errors.py": "",
            "llmopt/config.py": "from llmopt.errors import UsageError\n",  # foundation: fine
            # The tokenizer sits above the kernels (its native backend runs C code), so
            # it may use them, and the foundation may no longer use it.
            "llmopt/tokenizer.py": "from llmopt.kernels import build\n",
            "llmopt/kernels/__init__.py": "",
            "llmopt/corpus.py": "from llmopt.tokenizer import Tokenizer\n",
            "llmopt/engine/__init__.py": "",
            "llmopt/engine/y.py": "from llmopt.layers import x\n",  # downward: fine
            "llmopt/layers/__init__.py": "",
            "llmopt/layers/x.py": "def f():\n    from llmopt.engine.y import g\n",
            "llmopt/quant/__init__.py": "from . import a\n",  # its own package: fine
            "llmopt/quant/a.py": "import llmopt.server.b\nfrom ..engine import y\n",
            "llmopt/bench/__init__.py": "from llmopt.server import b\n",
            "llmopt/server/b.py": "",  # a namespace package, as the real server/ is
            "llmopt/weights/w.py": "from llmopt import LLM\nimport llmopt.new\n",
            "llmopt/new/__init__.py": "",
        },
    )
    assert check_layers.violations(root) == [
        "llmopt/bench/__init__.py:1: llmopt.bench -> llmopt.server.b (layer 10 imports layer 10)",
        "llmopt/corpus.py:1: llmopt.corpus -> llmopt.tokenizer (layer 0 imports layer 3)",
        "llmopt/layers/x.py:2: llmopt.layers.x -> llmopt.engine.y (layer 5 imports layer 9)",
        "llmopt/new/__init__.py:1: llmopt.new is in no layer (add it to LAYERS)",
        "llmopt/quant/a.py:1: llmopt.quant.a -> llmopt.server.b (layer 9 imports layer 10)",
        "llmopt/quant/a.py:2: llmopt.quant.a -> llmopt.engine.y (layer 9 imports layer 9)",
        "llmopt/weights/w.py:1: llmopt.weights.w -> llmopt (layer 4 imports layer 12)",
        "llmopt/weights/w.py:2: llmopt.weights.w -> llmopt.new (llmopt.new is in no layer)",
    ]
    assert check_layers.main(["check_layers.py", str(root)]) == 1
