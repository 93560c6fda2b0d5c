"""Check that no module under llmopt/ imports upward or sideways.

The packages are stacked in LAYERS, bottom to top. A module may import its own unit
(the package or module it belongs to) and anything in a lower layer. It may not import
a higher layer, nor another unit of its own layer: the units of one layer are peers
(engine and quant on the models; bench and server on the engine). The foundation is a
single unit, so its small modules may import one another (everything there uses
llmopt.errors). Every import counts, the ones inside functions and under TYPE_CHECKING
too: a deferred import is still a dependency. A module or an import that no layer
holds is an error, so a new package has to be placed here first.

Usage: python scripts/check_layers.py [REPO_ROOT]; exits 1 and prints
`file:line: A -> B (layer x imports layer y)` for each violation.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "llmopt"

# Bottom to top; each layer is a tuple of units, each unit a tuple of module names
# (a name covers its submodules, except the package root "llmopt", which is only itself).
LAYERS: tuple[tuple[tuple[str, ...], ...], ...] = (
    (  # 0 foundation
        (
            "llmopt.errors",
            "llmopt.config",
            "llmopt.device",
            "llmopt.corpus",
            "llmopt.atomic",
            "llmopt.heap",
            "llmopt.home",
            "llmopt.openai_wire",
        ),
    ),
    (("llmopt.store",),),  # 1
    (("llmopt.kernels",),),  # 2
    # 3: the tokenizer and its backends (vocab/). It was foundation until its native
    # SentencePiece backend came to run C code through the kernels' build; no module
    # below it needs a tokenizer, and the loader (which writes the vocabulary file) and
    # everything that tokenizes sit above.
    (("llmopt.tokenizer", "llmopt.vocab"),),
    (("llmopt.weights",),),  # 4
    (("llmopt.layers",),),  # 5
    (("llmopt.models",),),  # 6
    # 7: the split of a model over ranks: its weights' shards (which the loader cuts),
    # the communicating layers and a worker's loop; the engine's runner drives it.
    (("llmopt.distributed",),),
    (("llmopt.loader",),),  # 8
    # 9: peers. Quantization runs forward passes through models/scoring.py, never an
    # engine; the engine never needs quant/.
    (("llmopt.engine",), ("llmopt.quant",)),
    # 10: peers. The router speaks HTTP to replicas: it never imports the engine.
    (("llmopt.bench",), ("llmopt.server",), ("llmopt.router",)),
    # 11: the Ray Serve deployment. Its replicas run the server (server/) and its request
    # router runs the router's policies (router/): it needs both peers of layer 10, so
    # it sits above them rather than in either (the router must never import the engine).
    (("llmopt.cluster",),),
    (("llmopt.cli", "llmopt.__main__", "llmopt"),),  # 12 the surfaces
)


def place(module: str) -> tuple[int, int] | None:
    """(layer, unit) of a module name, or None if no layer holds it."""
    for layer, units in enumerate(LAYERS):
        for unit, names in enumerate(units):
            for name in names:
                if module == name or (name != PACKAGE and module.startswith(name + ".")):
                    return layer, unit
    return None


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _known_modules(root: Path) -> set[str]:
    """Every module and package (namespace packages too) under root/llmopt."""
    known = {PACKAGE}
    for path in (root / PACKAGE).rglob("*"):
        if path.suffix == ".py" or (path.is_dir() and path.name != "__pycache__"):
            known.add(module_name(path, root))
    return known


def imported_modules(
    tree: ast.AST, module: str, is_package: bool, known: set[str]
) -> list[tuple[int, str]]:
    """(line, module) of each llmopt module the source imports; `from P import N` names
    P.N where that is a module, else P."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package, up level - 1
                package = module.split(".") if is_package else module.split(".")[:-1]
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if sub in known else base))
    ours = (f for f in found if f[1] == PACKAGE or f[1].startswith(PACKAGE + "."))
    return list(dict.fromkeys(ours))  # `from P import a, b` of one package: once


def violations(root: Path) -> list[str]:
    """Every upward, sideways or unplaced import in the package under `root`."""
    known = _known_modules(root)
    out: list[str] = []
    for path in sorted((root / PACKAGE).rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        module = module_name(path, root)
        here = place(module)
        if here is None:
            out.append(f"{rel}:1: {module} is in no layer (add it to LAYERS)")
            continue
        tree = ast.parse(path.read_text(), filename=rel)
        for line, target in imported_modules(tree, module, path.name == "__init__.py", known):
            there = place(target)
            if there is None:
                out.append(f"{rel}:{line}: {module} -> {target} ({target} is in no layer)")
            elif there[0] > here[0] or (there[0] == here[0] and there[1] != here[1]):
                out.append(
                    f"{rel}:{line}: {module} -> {target} (layer {here[0]} imports layer {there[0]})"
                )
    return out


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent
    found = violations(root)
    for v in found:
        print(v)
    if found:
        print(f"{len(found)} import(s) break the layering", file=sys.stderr)
        return 1
    print(f"layers OK: no upward or sideways import under {root / PACKAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
