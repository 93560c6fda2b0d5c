"""Write the held-out texts that quality figures are judged on, beside the default
(pydoc_data.topics' second half, which `llmopt bench --perplexity` reads by itself):

  gpl3.txt      English legal prose: /usr/share/common-licenses/GPL-3 (Debian)
  argparse.txt  Python source: the running CPython's Lib/argparse.py
  spanish.txt   Spanish technical prose: Debian's Spanish manual pages
                (/usr/share/man/es, from man-db, dpkg, apt, debianutils, fakeroot),
                in path order, troff requests dropped but for the text of the font
                and heading macros, escapes decoded
  english.txt   English technical prose: the English originals of those pages
                (/usr/share/man, the same names), read the same way; added in the
                twelfth session, after the three above had judged calibration variants
  docstrings.txt  English prose about Python, the nearest to pydoc's topics that none of
                the above is: the docstrings over 200 characters of the running
                CPython's Lib/*.py (argparse.py left out), in path order; added in the
                thirteenth session, judged only after the variants it scores were made
  torchnn.txt   English prose about a Python library, with reST markup and maths: the
                docstrings over 200 characters of the installed torch's
                torch/nn/modules/*.py, in path order (398,128 characters from torch
                2.13.0); added in the fourteenth session, its rule fixed before any
                checkpoint was scored on it
  email.txt     Python source again, other than argparse's: the running CPython's
                Lib/email/*.py, in path order; added in the sixteenth session, after
                every choice of `--fp4` and `--int4` had been made
  readmes.txt   English prose in Markdown: the long descriptions (text/markdown) over
                2,000 characters of the installed distributions but llmopt, in name
                order, without the lines of HTML and of badge images; added with
                email.txt

No calibration reads these. Choices made after a text was written were judged on it
(BENCHMARKS.md says which), so for those it is no longer unseen. (The Spanish Rust by
Example of a rustup toolchain, used before, is mostly untranslated pages: about 10 KB
of it is Spanish.)

    python scripts/held_out_texts.py OUT_DIR
"""

from __future__ import annotations

import argparse
import ast
import gzip
import re
import shutil
from pathlib import Path

GPL3 = Path("/usr/share/common-licenses/GPL-3")
MAN = Path("/usr/share/man")
MAN_ES = MAN / "es"
DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)  # docstrings
TEXT_MACROS = {"B", "I", "BR", "IR", "RI", "BI", "IB", "RB", "SH", "SS"}  # keep their text
# troff's named characters (\(xy) that Spanish pages use
GLYPHS = {
    "~n": "ñ", "~N": "Ñ", "'a": "á", "'e": "é", "'i": "í", "'o": "ó", "'u": "ú",
    "'A": "Á", "'E": "É", "'I": "Í", "'O": "Ó", "'U": "Ú", ":u": "ü", "r?": "¿",
    "r!": "¡", "Fo": "«", "Fc": "»", "aq": "'", "dq": '"', "lq": '"', "rq": '"',
    "em": "-", "en": "-", "hy": "-", "co": "(c)", "bu": "*",
}  # fmt: skip


def _man_text(page: Path) -> str:
    lines = []
    with gzip.open(page, "rt", errors="replace") as f:
        source = f.read().splitlines()
    for line in source:
        if line.startswith((".", "'")):
            request = line[1:].split(None, 1)
            if len(request) < 2 or request[0] not in TEXT_MACROS:
                continue
            line = request[1].replace('"', "")
        line = re.sub(r"\\\((..)", lambda m: GLYPHS.get(m.group(1), " "), line)
        line = re.sub(r"\\\[(..)\]", lambda m: GLYPHS.get(m.group(1), " "), line)
        line = re.sub(r"\\f(\[[A-Z]*\]|.)|\\s[-+]?\d", "", line)  # font, size
        pairs = ("\\-", "-"), ("\\&", ""), ("\\|", ""), ("\\/", ""), ("\\ ", " "), ("\\e", "\\")
        for esc, ch in pairs:
            line = line.replace(esc, ch)
        lines.append(line)
    return re.sub(r"[ \t]+", " ", "\n".join(lines)).strip()


def _spanish_pages() -> list[Path]:
    return sorted(MAN_ES.rglob("*.gz"))


def spanish_text() -> str:
    return "\n\n".join(_man_text(p) for p in _spanish_pages())


def english_text() -> str:
    """The English pages of the Spanish text's names, in the same order."""
    pages = [MAN / p.relative_to(MAN_ES) for p in _spanish_pages()]
    return "\n\n".join(_man_text(p) for p in pages if p.is_file())


def _docstrings(paths: list[Path]) -> str:
    """The docstrings over 200 characters of these Python files, in order."""
    docs = []
    for path in paths:
        try:
            tree = ast.parse(path.read_text())
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            doc = ast.get_docstring(node) if isinstance(node, DOCUMENTED) else None
            if doc and len(doc) > 200:
                docs.append(doc)
    return "\n\n".join(docs)


def docstrings_text() -> str:
    lib = Path(argparse.__file__).parent
    return _docstrings([p for p in sorted(lib.glob("*.py")) if p.name != "argparse.py"])


def torchnn_text() -> str:
    import torch

    return _docstrings(sorted((Path(torch.__file__).parent / "nn" / "modules").glob("*.py")))


def email_text() -> str:
    lib = Path(argparse.__file__).parent / "email"
    return "\n\n".join(p.read_text() for p in sorted(lib.glob("*.py")))


def _markup(line: str) -> bool:
    """An HTML line or a badge image: layout, not prose."""
    return line.lstrip().startswith(("<", "[![", "!["))


def readmes_text() -> str:
    """The Markdown long descriptions of the installed distributions, by name."""
    from importlib.metadata import distributions

    docs = {}
    for dist in distributions():
        meta = dist.metadata
        name = (meta["Name"] or "").lower()
        body = meta.get_payload() or meta["Description"] or ""  # type: ignore[attr-defined]
        markdown = (meta["Description-Content-Type"] or "").startswith("text/markdown")
        if markdown and name != "llmopt" and len(body) > 2000:
            lines = [line for line in body.splitlines() if not _markup(line)]
            docs[name] = "\n".join(lines).strip()
    return "\n\n".join(docs[n] for n in sorted(docs))


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("out", type=Path)
    out = ap.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(GPL3, out / "gpl3.txt")
    shutil.copyfile(Path(argparse.__file__), out / "argparse.txt")
    (out / "spanish.txt").write_text(spanish_text())
    (out / "english.txt").write_text(english_text())
    (out / "docstrings.txt").write_text(docstrings_text())
    (out / "torchnn.txt").write_text(torchnn_text())
    (out / "email.txt").write_text(email_text())
    (out / "readmes.txt").write_text(readmes_text())
    for f in sorted(out.glob("*.txt")):
        print(f"{f}: {f.stat().st_size} bytes")


if __name__ == "__main__":
    main()
