"""Build a `tokenizers` tokenizer from the vocabulary stored in a GGUF file.

Byte-level BPE vocabularies (GGUF model "gpt2": GPT-2, SmolLM, Llama 3, Qwen2) are
built here directly from tokens and merges, with the pre-tokenizer split that
llama.cpp uses for the file's `tokenizer.ggml.pre`. Other kinds (SentencePiece
"llama") go through transformers' GGUF converter, which is slower but general; for
Gemma's, `spm_vocabulary` also gives the compact file of the native tokenizer, which
reproduces that converter's tokenizer; for byte-level ones, `bpe_vocabulary` gives the
native byte-level tokenizer's file, which reproduces the one built here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from llmopt.errors import ModelFormatError
from llmopt.vocab.byte_alphabet import BYTE_TO_CHAR, unspell
from llmopt.vocab.pretokenize import LLAMA3, QWEN2, SPLITS, split_of
from llmopt.vocab.spm_file import (
    ADDED,
    MAX_MERGES,
    NO_TOKEN,
    SHADOWED,
    SPECIAL,
    VERBATIM,
    BpeVocab,
    SpmVocab,
)


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in ("default", "gpt2", "gpt-2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        # Digits one at a time, then the GPT-2 split.
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    regex = {"llama-bpe": LLAMA3, "llama3": LLAMA3, "qwen2": QWEN2}.get(pre)
    if regex is None:
        raise _Unsupported(pre)
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(regex), behavior="isolated"), byte_level]
    )


class _Unsupported(Exception):
    pass


# GGUF token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
_CONTROL, _USER_DEFINED = 3, 4
# The architectures whose SentencePiece vocabulary transformers converts with
# `gemma_tokenizer` (integrations/gguf/gguf_tokenizer_mapping.py): ' ' becomes U+2581, no
# prefix space, merges ranked by the tokens' order in the file. The native tokenizer
# reproduces that one; other SentencePiece files stay on tokenizer.json.
_GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")


def build_tokenizer(meta: dict[str, Any], gguf_path: Path, out_dir: Path) -> Tokenizer:
    """Return a tokenizer for the GGUF vocabulary in `meta` (fields already decoded)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        try:
            return _byte_level_bpe(meta)
        except _Unsupported:
            pass
    if kind is None:
        raise ModelFormatError(f"{gguf_path.name} carries no tokenizer")
    return _via_transformers(gguf_path, out_dir)


def spm_vocabulary(meta: dict[str, Any]) -> SpmVocab | None:
    """The native tokenizer's vocabulary for a Gemma-style SentencePiece file, built the
    way transformers builds its tokenizer from it; None for any other vocabulary."""
    if meta.get("tokenizer.ggml.model") != "llama":
        return None
    if meta.get("general.architecture") not in _GEMMA_ARCHS:
        return None
    if meta.get("tokenizer.ggml.add_space_prefix", False):
        return None  # transformers' Gemma tokenizer never adds one: not what it means
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] | None = meta.get("tokenizer.ggml.token_type")
    if types is None or len(types) != len(tokens):
        return None
    # Gemma files store the runs of spaces as spaces; the tokenizer spells them U+2581,
    # the character a space becomes before BPE.
    spelled = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    flags = [0] * len(tokens)
    for i, (t, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind == _CONTROL:
            flags[i] = ADDED | SPECIAL
        elif kind == _USER_DEFINED and spelled[i] == t:
            # transformers adds a user-defined token only under its own spelling: the
            # respelled space runs are reached by merges like any other token.
            flags[i] = ADDED
    # Merges rank by position in the file (the earlier token first), not by the
    # scores, which for Gemma do not follow the merge order.
    scores = [-float(i) for i in range(len(tokens))]
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    return SpmVocab(spelled, scores, flags, None if unk is None else int(unk))


def bpe_vocabulary(meta: dict[str, Any]) -> BpeVocab | None:
    """The native byte-level tokenizer's vocabulary for a GGUF "gpt2" file whose
    pre-tokenizer it knows, with the tokens, added tokens and merges `_byte_level_bpe`
    gives `tokenizers`; None for any other vocabulary."""
    if meta.get("tokenizer.ggml.model") != "gpt2":
        return None
    split = split_of(meta.get("tokenizer.ggml.pre", "default"))
    if split is None:
        return None
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    texts: list[bytes] = []
    flags = [0] * len(tokens)
    for i, (tok, kind) in enumerate(zip(tokens, types, strict=True)):
        raw = None if kind in (_CONTROL, _USER_DEFINED) else unspell(tok)
        if raw is None:
            # Added tokens are matched in the raw text as written; an ordinary token
            # outside the alphabet is decoded as written.
            raw = tok.encode("utf-8", "surrogatepass")
            flags[i] = {_CONTROL: ADDED | SPECIAL, _USER_DEFINED: ADDED}.get(kind, VERBATIM)
        texts.append(raw)
        if vocab[tok] != i:
            flags[i] |= SHADOWED
    merges: list[tuple[int, int, int]] = []
    for merge in meta["tokenizer.ggml.merges"]:
        parts = merge.split(" ", 1)
        ids = [vocab.get(t) for t in (*parts, "".join(parts))]
        if len(parts) != 2 or None in ids:
            return None  # `tokenizers` refuses it too: tokenizer.json says why
        merges.append((ids[0], ids[1], ids[2]))  # type: ignore[arg-type]
    if len(merges) >= MAX_MERGES:
        return None
    byte_ids = [vocab.get(BYTE_TO_CHAR[b], NO_TOKEN) for b in range(256)]
    return BpeVocab(texts, flags, byte_ids, merges, SPLITS.index(split))


def _byte_level_bpe(meta: dict[str, Any]) -> Tokenizer:
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    pre = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tk.pre_tokenizer = pre
    tk.decoder = decoders.ByteLevel()
    added = [
        AddedToken(tok, special=t == _CONTROL, normalized=False)
        for tok, t in zip(tokens, types, strict=True)
        if t in (_CONTROL, _USER_DEFINED)
    ]
    tk.add_tokens(added)
    return tk


def _via_transformers(gguf_path: Path, out_dir: Path) -> Tokenizer:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ModelFormatError(
            f"{gguf_path.name} has a SentencePiece-style vocabulary; converting it needs "
            "transformers: pip install 'llmopt[transformers]'"
        ) from None
    hf = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    hf.save_pretrained(str(out_dir))
    return Tokenizer.from_file(str(out_dir / "tokenizer.json"))
