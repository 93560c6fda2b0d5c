"""Tokenizer metadata for a GGUF export, read from a Hugging Face folder.

llama.cpp re-implements each tokenizer itself, so the file must say which one:
"gpt2" (byte-level BPE: tokens, types, merges, and the name of the pre-tokenizer
split) or "llama" (SentencePiece: tokens, scores, types from tokenizer.model).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gguf import GGUFWriter, SpecialVocab, TokenType

from llmopt.errors import ModelFormatError
from llmopt.vocab.pretokenize import LLAMA3, QWEN2

# The pre-tokenizer regexes llama.cpp knows by name, as tokenizer.json spells them.
_SPLIT_NAMES = {LLAMA3: "llama-bpe", QWEN2: "qwen2"}


def add_vocab(writer: GGUFWriter, folder: Path, vocab_size: int) -> None:
    """Add the tokenizer of `folder`, padded to the model's `vocab_size` rows."""
    path = folder / "tokenizer.json"
    tok = json.loads(path.read_text()) if path.is_file() else {}
    model = tok.get("model", {})
    byte_level = (
        model.get("type") == "BPE"
        and not model.get("byte_fallback", False)
        and (tok.get("decoder") or {}).get("type") == "ByteLevel"
    )
    if byte_level:
        _add_byte_level_bpe(writer, tok, vocab_size)
    elif (folder / "tokenizer.model").is_file():
        _add_sentencepiece(writer, folder, vocab_size)
    else:
        raise ModelFormatError(
            f"{folder} has neither a byte-level BPE tokenizer.json nor a SentencePiece "
            "tokenizer.model; GGUF export supports only those two"
        )
    # Merges, special token ids, add_bos/add_eos and the chat template.
    special = SpecialVocab(folder, load_merges=byte_level, n_vocab=vocab_size)
    special.add_to_gguf(writer, quiet=True)


def _add_byte_level_bpe(writer: GGUFWriter, tok: dict[str, Any], vocab_size: int) -> None:
    tokens = {i: t for t, i in tok["model"]["vocab"].items()}
    types = dict.fromkeys(tokens, TokenType.NORMAL)
    for added in tok.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = TokenType.CONTROL if added["special"] else TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(tok.get("pre_tokenizer")))
    _add_tokens(writer, tokens, types, vocab_size)


def _add_sentencepiece(writer: GGUFWriter, folder: Path, vocab_size: int) -> None:
    from gguf.vocab import SentencePieceVocab

    try:
        vocab = SentencePieceVocab(folder)
    except RuntimeError as e:  # raised when the sentencepiece package is missing
        raise ModelFormatError(f"{e}: pip install sentencepiece") from None
    entries = list(vocab.all_tokens())
    tokens = {i: text.decode("utf-8") for i, (text, _, _) in enumerate(entries)}
    types = {i: typ for i, (_, _, typ) in enumerate(entries)}
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    scores = [score for _, score, _ in entries]
    writer.add_token_scores(scores + [-1000.0] * (vocab_size - len(scores)))
    _add_tokens(writer, tokens, types, vocab_size)


def _add_tokens(
    writer: GGUFWriter, tokens: dict[int, str], types: dict[int, TokenType], vocab_size: int
) -> None:
    if max(tokens) >= vocab_size:
        raise ModelFormatError(
            f"the tokenizer has {len(tokens)} tokens but the model only {vocab_size} rows"
        )
    # Embedding rows past the tokenizer (Qwen2 rounds its vocabulary up) get
    # placeholder tokens, as llama.cpp expects one token per row.
    writer.add_token_list([tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)])
    writer.add_token_types([types.get(i, TokenType.UNUSED) for i in range(vocab_size)])


def _pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's name for a tokenizer.json pre-tokenizer (it has no generic regex path)."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [s["type"] for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"  # digits one at a time, then the GPT-2 split
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = _SPLIT_NAMES.get(steps[0].get("pattern", {}).get("Regex"))
        if name:
            return name
    raise ModelFormatError(
        f"tokenizer.json's pre-tokenizer ({json.dumps(pre)[:200]}) is not one llmopt can "
        "name for llama.cpp; known: GPT-2, SmolLM (digits + GPT-2), Llama 3 and Qwen2 splits"
    )
