"""The native byte-level BPE tokenizer (llmopt/vocab/bpe.py, kernels/spm_tokenizer.c):
its rules on tiny hand-built vocabularies, its file's damage checks, and on the real
SmolLM2 vocabulary (and the same vocabulary under the other pre-tokenizers) the ids and
text of the `tokenizers` tokenizer llmopt/loader/gguf_tokenizer.py builds from the same
GGUF metadata (the reference)."""

from __future__ import annotations

import inspect
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llmopt.errors import ModelFormatError
from llmopt.loader.gguf_tokenizer import _byte_level_bpe, bpe_vocabulary
from llmopt.tokenizer import Tokenizer
from llmopt.vocab.backend import HFBackend
from llmopt.vocab.bpe import BpeBackend
from llmopt.vocab.byte_alphabet import BYTE_TO_CHAR
from llmopt.vocab.native import native_available
from llmopt.vocab.spm_file import BPE_FILENAME as FILENAME
from llmopt.vocab.spm_file import write_spm
from tests.tokenizer_texts import assert_100kb_encodes_fast, assert_same_ids_and_text, texts

pytestmark = pytest.mark.skipif(not native_available(), reason="no C compiler")


class Reference:
    """The `tokenizers` tokenizer of a metadata dict, called as llmopt calls it."""

    def __init__(self, meta: dict[str, Any]) -> None:
        self.tk = _byte_level_bpe(meta)

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode(ids, skip_special_tokens=True)


def native(meta: dict[str, Any], folder: Path) -> BpeBackend:
    vocab = bpe_vocabulary(meta)
    assert vocab is not None
    folder.mkdir(parents=True, exist_ok=True)
    write_spm(vocab, folder / FILENAME)
    backend = BpeBackend.load(folder / FILENAME)
    assert backend is not None
    return backend


def tiny_meta(
    tokens: list[str], merges: list[str], pre: str = "gpt2", types: dict[int, int] | None = None
) -> dict[str, Any]:
    """A vocabulary of the 256 byte characters, then `tokens`; `types` by index there."""
    all_tokens = [*BYTE_TO_CHAR, *tokens]
    kinds = [1] * len(all_tokens)
    for i, kind in (types or {}).items():
        kinds[256 + i] = kind
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": all_tokens,
        "tokenizer.ggml.token_type": kinds,
        "tokenizer.ggml.merges": merges,
    }


def spelled(tk: BpeBackend, text: str) -> list[str]:
    return [tk.piece(i) for i in tk.encode(text)]


def test_the_lowest_rank_merges_first_and_ties_go_left(tmp_path) -> None:
    meta = tiny_meta(["ab", "bc", "aa", "aaaa"], ["b c", "a b", "a a", "aa aa"])
    tk = native(meta, tmp_path)
    ref = Reference(meta)
    for text in ["abc", "aaa", "aaaaa", "aaaaaaa", "abcabc aaab", ""]:
        assert tk.encode(text) == ref.encode(text), text
    assert spelled(tk, "abc") == ["a", "bc"]  # rank 0 before rank 1
    assert spelled(tk, "aaaaa") == ["aaaa", "a"]  # a|a at 0 and 2 first, then aa|aa


def test_a_pair_listed_twice_keeps_its_later_rank(tmp_path) -> None:
    meta = tiny_meta(["ab", "bc"], ["a b", "b c", "a b"])
    tk = native(meta, tmp_path)
    assert tk.encode("abc") == Reference(meta).encode("abc")
    assert spelled(tk, "abc") == ["a", "bc"]


def test_bytes_without_a_token_drop_and_their_neighbours_merge(tmp_path) -> None:
    meta = tiny_meta(["ab"], ["a b"])
    meta["tokenizer.ggml.tokens"] = [
        "<none>" if t == "x" else t for t in meta["tokenizer.ggml.tokens"]
    ]
    tk = native(meta, tmp_path)
    assert tk.encode("axb axxb") == Reference(meta).encode("axb axxb")
    assert spelled(tk, "axb") == ["ab"]  # one piece: "x" is a letter


def test_added_tokens_split_first_and_decode_as_the_byte_level_decoder(tmp_path) -> None:
    # Control tokens are special (left out of decoded text), user-defined ones not; an
    # added token spelled in the alphabet ("Ġx", "é") decodes to the bytes it spells.
    tokens = ["<s>", "<|x|>", "<|x", "Ġx", "é", "中", "Ġa", "ab"]
    types = {0: 3, 1: 3, 2: 4, 3: 4, 4: 4, 5: 1}
    meta = tiny_meta(tokens, ["Ġ a", "a b"], types=types)
    tk = native(meta, tmp_path)
    ref = Reference(meta)
    for text in ["<s>a<|x|><|x <|x|x|> Ġx é 中 ab", "<s><s>", " ab<|x"]:
        ids = tk.encode(text)
        assert ids == ref.encode(text), text
        assert tk.decode(ids) == ref.decode(ids)
    rnd = random.Random(0)
    for _ in range(300):
        ids = [rnd.randrange(0, 270) for _ in range(rnd.randint(0, 6))]
        assert tk.decode(ids) == ref.decode(ids), ids
    vocab = ref.tk.get_vocab(with_added_tokens=True)
    assert tk.vocabulary() == vocab
    for token, token_id in vocab.items():
        assert tk.token_to_id(token) == ref.tk.token_to_id(token) == token_id
    assert tk.token_to_id("nope") is None


# The other pre-tokenizers, on texts that tell their patterns apart.
_SPLIT_TEXTS = [
    "Hello world, it's 2024: 12345678 apples; DON'T we'LL you've",
    "  spaces   before\n\n\r\n\tand\t\tafter  \n",
    "x\u00a0y\u3000z\u2028 \x85\x1c\x1f end",
    "numbers ١٢٣٤ ⅷ ² 3.14159 and $100,000!!! ...?",
    "中文测试，你好世界。日本語のテキストです。مرحبا بالعالم",  # noqa: RUF001
    "emoji 😀🫠🧑‍🚀👨‍👩‍👧 \x00\x01\x7f",
]


@pytest.fixture(scope="module")
def smollm_meta(smollm_gguf: Path) -> dict[str, Any]:
    from llmopt.loader.gguf import GGUFFile

    return GGUFFile(smollm_gguf).meta


@pytest.mark.parametrize("pre", ["gpt2", "default", "llama-bpe", "llama3", "qwen2", "smollm"])
def test_every_pre_tokenizer_matches_tokenizers(smollm_meta, tmp_path, pre) -> None:
    """SmolLM2's vocabulary under each pre-tokenizer the native tokenizer knows."""
    meta = {**smollm_meta, "tokenizer.ggml.pre": pre}
    tk, ref = native(meta, tmp_path), Reference(meta)
    for text in [*_SPLIT_TEXTS, inspect.getsource(json.decoder)[:4000]]:
        assert tk.encode(text) == ref.encode(text), (pre, text[:60])


def test_only_known_byte_level_vocabularies_get_the_native_file(smollm_meta) -> None:
    assert bpe_vocabulary({**smollm_meta, "tokenizer.ggml.pre": "deepseek-llm"}) is None
    assert bpe_vocabulary({**smollm_meta, "tokenizer.ggml.model": "llama"}) is None
    broken = {**smollm_meta, "tokenizer.ggml.merges": ["Ġ nonesuch-token"]}
    assert bpe_vocabulary(broken) is None


# The real SmolLM2 vocabulary: 49,152 tokens, 48,900 merges, pre-tokenizer "smollm".


@pytest.fixture(scope="module")
def both(smollm_meta, tmp_path_factory) -> tuple[BpeBackend, Reference]:
    assert smollm_meta["tokenizer.ggml.pre"] == "smollm"
    return native(smollm_meta, tmp_path_factory.mktemp("smollm")), Reference(smollm_meta)


def test_smollm2_ids_and_text_match_tokenizers(both) -> None:
    own = [
        "I'm sure it's fine; you're, they've, we'll, he'd, can't. DON'T SHOUT'S 'tis",
        "0 12 345 6789 3.14159265358979 1,000,000 2024-01-31 0x1F 1e-9 ٣٤٥",
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n",
        "<|endoftext|><|endoftext|>x<|im_end|><repo_name>a<file_sep>b<|im_start",
        "中文测试，你好世界。日本語のテキストです。مرحبا بالعالم",  # noqa: RUF001
        "emoji 😀🫠🧑‍🚀 👨‍👩‍👧‍👦 🏳️‍🌈, rare 𓀀 \U0010fffd",
        "controls \x00 NUL \x01\x02\x1b[31m \x7f \x85 \x1c\x1d\x1e\x1f \u200b\u2028\ufeff",
    ]
    assert_same_ids_and_text(*both, texts(*own))


def test_smollm2_decode_matches_tokenizers_on_random_ids(both) -> None:
    """Special tokens, cut UTF-8 characters (what streaming detokenization sees), ids
    outside the vocabulary."""
    tk, ref = both
    rnd = random.Random(0)
    # Bytes that never occur in UTF-8 (0xC0, 0xF5...) have no token in SmolLM2.
    single_bytes = [i for c in BYTE_TO_CHAR if (i := tk.token_to_id(c)) is not None]
    assert len(single_bytes) == 235
    for _ in range(3000):
        ids = [
            rnd.choice([rnd.randrange(49_152), rnd.choice(single_bytes), rnd.randrange(20), 49_152])
            for _ in range(rnd.randint(0, 10))
        ]
        assert tk.decode(ids) == ref.decode(ids), ids


def test_smollm2_vocabulary_matches_tokenizers(both) -> None:
    tk, ref = both
    vocab = ref.tk.get_vocab(with_added_tokens=True)
    assert tk.vocabulary() == vocab and tk.vocab_size == len(vocab) == 49_152
    for token in ["<|im_start|>", "<|endoftext|>", "Ġthe", "Ċ", "ĠĠ", "Hello", "nope!"]:
        assert tk.token_to_id(token) == ref.tk.token_to_id(token)


def test_smollm2_100kb_encodes_fast(both) -> None:
    assert_100kb_encodes_fast(*both)  # about 16 ms (`tokenizers`: about 30 ms)


def test_tokenizer_uses_the_native_file_without_importing_tokenizers(both, tmp_path) -> None:
    tk, ref = both
    folder = tk._path.parent
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>"}))
    ids = ref.encode("<|im_start|>Hi")
    code = (
        "import sys; from pathlib import Path; from llmopt.tokenizer import Tokenizer\n"
        f"t = Tokenizer(Path({str(folder)!r}))\n"
        "assert type(t._tk).__name__ == 'BpeBackend', type(t._tk)\n"
        f"assert t.encode('<|im_start|>Hi') == {ids}\n"
        f"assert t.bos_id == 1 and t.decode({ids}) == 'Hi'\n"
        "assert 'tokenizers' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
    assert Tokenizer(folder).same_vocabulary(Tokenizer(folder))


def test_without_a_c_compiler_the_folder_falls_back_to_tokenizer_json(
    both, tmp_path, monkeypatch
) -> None:
    import llmopt.tokenizer

    tk, ref = both
    (tmp_path / FILENAME).write_bytes((tk._path).read_bytes())
    ref.tk.save(str(tmp_path / "tokenizer.json"))
    monkeypatch.setattr(llmopt.tokenizer, "native_available", lambda: False)
    tok = Tokenizer(tmp_path)
    assert isinstance(tok._tk, HFBackend) and tok.encode("Hi there") == ref.encode("Hi there")


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[:36],  # shorter than its header
        lambda b: b[: len(b) - 3],  # truncated
        lambda b: b[:-1] + bytes([b[-1] ^ 1]),  # a flipped bit
        lambda b: b[:12] + b"\x07" + b[13:],  # an unknown kind
        lambda b: b[:8] + b"\x09" + b[9:],  # a version from the future
        lambda b: b[:8] + b"\x01" + b[9:],  # read as the older SentencePiece layout
    ],
)
def test_a_damaged_file_is_a_one_line_error(tmp_path, damage) -> None:
    native(tiny_meta(["ab"], ["a b"]), tmp_path)
    path = tmp_path / FILENAME
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ModelFormatError) as err:
        BpeBackend.load(path)
    assert "\n" not in err.value.message and str(path) in err.value.message
