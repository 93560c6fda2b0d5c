"""The format of a GGUF file's converted folder, written into it, so that a folder an
older llmopt converted gets the files it lacks instead of being used as it is (the
folder's key is the GGUF file's path, size and time, which a new llmopt leaves alone).

1: config.json, tokenizer.json, tokenizer_config.json, the tensor index (no format file).
2: and tokenizer.spm, the native tokenizer's vocabulary, for Gemma-style vocabularies.
3: and tokenizer.bpe, the native byte-level tokenizer's, for GGUF "gpt2" vocabularies.
"""

from __future__ import annotations

import json
from pathlib import Path

FORMAT = 3
FORMAT_FILE = "llmopt_format.json"


def format_of(folder: Path) -> int:
    """The format of a converted folder (1 where it has no format file)."""
    try:
        return int(json.loads((folder / FORMAT_FILE).read_text())["format"])
    except (OSError, ValueError, KeyError, TypeError):
        return 1
