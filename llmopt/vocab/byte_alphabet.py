"""GPT-2's byte-to-character alphabet: byte-level BPE vocabularies spell every byte as a
printable character (GGUF "gpt2" files store their tokens so), which the native
tokenizer's file undoes to keep raw bytes. The C decoder has the inverse as a formula
(alphabet_byte in llmopt/kernels/spm_tokenizer.c)."""

from __future__ import annotations


def _alphabet() -> tuple[str, ...]:
    # The printable Latin-1 bytes stand for themselves; the others (controls, space, DEL,
    # NBSP, soft hyphen) take the code points from U+0100 on, in byte order.
    own = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    spelled, extra = [], 0
    for b in range(256):
        if b in own:
            spelled.append(chr(b))
        else:
            spelled.append(chr(0x100 + extra))
            extra += 1
    return tuple(spelled)


BYTE_TO_CHAR: tuple[str, ...] = _alphabet()
CHAR_TO_BYTE: dict[str, int] = {c: b for b, c in enumerate(BYTE_TO_CHAR)}


def unspell(token: str) -> bytes | None:
    """The bytes a token spelled in the alphabet stands for; None where a character of it
    is not in the alphabet."""
    try:
        return bytes(CHAR_TO_BYTE[c] for c in token)
    except KeyError:
        return None


def spell(raw: bytes) -> str:
    return "".join(BYTE_TO_CHAR[b] for b in raw)
