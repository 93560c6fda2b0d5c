"""The native SentencePiece BPE tokenizer (llmopt/vocab/spm.py, kernels/spm_tokenizer.c):
its rules on a tiny hand-built vocabulary, its file's damage checks, and on the real
Gemma 3 vocabulary the ids and text of the tokenizer transformers converts from the
same GGUF (the reference), with llama.cpp's ids beside them where the two agree."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from rich.console import Console

from llmopt.errors import ModelFormatError
from llmopt.store.store import Store
from llmopt.tokenizer import Tokenizer
from llmopt.vocab.backend import HFBackend
from llmopt.vocab.spm import SpmBackend, native_available
from llmopt.vocab.spm_file import ADDED, BPE_FILENAME, FILENAME, SPECIAL, SpmVocab, write_spm
from tests.conftest import REAL_HOME
from tests.tokenizer_texts import assert_100kb_encodes_fast, assert_same_ids_and_text, texts

pytestmark = pytest.mark.skipif(not native_available(), reason="no C compiler")

BYTES = [f"<0x{b:02X}>" for b in range(256)]


def tiny(
    tmp_path: Path, pieces: dict[str, float], added: dict[str, int] | None = None
) -> SpmBackend:
    """A vocabulary of <unk>, the 256 byte tokens, then `pieces` (text: score) and
    `added` (text: flags), written and loaded."""
    added = added or {}
    tokens = ["<unk>", *BYTES, *pieces, *added]
    scores = [0.0] * 257 + list(pieces.values()) + [0.0] * len(added)
    flags = [0] * (257 + len(pieces)) + list(added.values())
    write_spm(SpmVocab(tokens, scores, flags, unk_id=0), tmp_path / FILENAME)
    backend = SpmBackend.load(tmp_path / FILENAME)
    assert backend is not None
    return backend


def pieces(tk: SpmBackend, text: str) -> list[str]:
    return [tk.piece(i) for i in tk.encode(text)]


def test_the_best_scored_pair_merges_first_and_ties_go_left(tmp_path) -> None:
    tk = tiny(tmp_path, {"a": 0, "b": 0, "c": 0, "ab": -2, "bc": -1, "aa": -3})
    assert pieces(tk, "abc") == ["a", "bc"]  # bc scores higher than ab
    assert pieces(tk, "aaa") == ["aa", "a"]  # one pair twice: the leftmost first
    assert pieces(tk, "") == []


def test_equal_scores_rank_as_transformers_orders_the_merges(tmp_path) -> None:
    # generate_merges sorts by score, then the longer left part, then the merged token's
    # id. After "ab", both "ab|c" and "c|d" score -1: the longer left part wins though
    # "cd" has the lower id.
    tk = tiny(tmp_path, {"a": 0, "b": 0, "c": 0, "d": 0, "ab": 0, "cd": -1, "abc": -1})
    assert pieces(tk, "abcd") == ["abc", "d"]
    # Equal scores and equal left parts: the lower id ("yz" before "zz") merges first.
    tk = tiny(tmp_path, {"y": 0, "z": 0, "yz": -1, "zz": -1})
    assert pieces(tk, "yzz") == ["yz", "z"]


def test_unknown_characters_fall_back_to_bytes_and_never_merge(tmp_path) -> None:
    tk = tiny(tmp_path, {"a": 0, "▁": 0, "▁a": -1, "<0xC3>a": -1})
    assert pieces(tk, " aé") == ["▁a", "<0xC3>", "<0xA9>"]
    assert pieces(tk, "éa") == ["<0xC3>", "<0xA9>", "a"]  # no merge into "<0xC3>a"
    assert tk.decode(tk.encode(" aé")) == " aé"


def test_without_byte_tokens_unknown_characters_fuse_into_one_unknown(tmp_path) -> None:
    tokens = ["<unk>", "a"]
    write_spm(SpmVocab(tokens, [0.0, 0.0], [0, 0], unk_id=0), tmp_path / FILENAME)
    tk = SpmBackend.load(tmp_path / FILENAME)
    assert tk is not None and tk.encode("aéèa") == [1, 0, 1]


def test_added_tokens_split_the_text_first_longest_match(tmp_path) -> None:
    tk = tiny(
        tmp_path,
        {"a": 0, "<": 0, "c": 0, ">": 0},
        {"\n": ADDED, "\n\n": ADDED, "<c>": ADDED | SPECIAL, "<ca>": ADDED},
    )
    assert pieces(tk, "a\n\n\na") == ["a", "\n\n", "\n", "a"]
    assert pieces(tk, "<c><ca><c") == ["<c>", "<ca>", "<", "c"]
    # Decoding leaves the special ones out, not the other added tokens.
    assert tk.decode(tk.encode("a<c>\n<ca>")) == "a\n<ca>"


def test_decode_reads_byte_runs_as_utf8_or_one_replacement_per_byte(tmp_path) -> None:
    tk = tiny(tmp_path, {"a": 0, "▁b": 0})
    ids = {t: tk.token_to_id(t) for t in ["a", "▁b", "<0xE2>", "<0x82>", "<0xAC>", "<0xFF>"]}
    euro = [ids["<0xE2>"], ids["<0x82>"], ids["<0xAC>"]]
    assert tk.decode([ids["a"], *euro, ids["▁b"]]) == "a€ b"
    # A character cut short (what streaming detokenization sees) ends in U+FFFD.
    assert tk.decode([ids["a"], *euro[:2]]) == "a\ufffd\ufffd"
    assert tk.decode([ids["<0xFF>"], ids["a"]]) == "\ufffda"
    assert tk.decode([-1, 10**9, ids["a"]]) == "a"  # ids outside the vocabulary: skipped


def test_token_ids_and_vocabulary(tmp_path) -> None:
    tk = tiny(tmp_path, {"▁hi": 0})
    assert tk.token_to_id("▁hi") == 257 and tk.token_to_id("nope") is None
    assert tk.vocab_size == 258 and tk.vocabulary()["<0x41>"] == 66


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[:20],  # shorter than the header
        lambda b: b[: len(b) - 3],  # truncated
        lambda b: b[:-1] + bytes([b[-1] ^ 1]),  # a flipped bit
        lambda b: b"NOTSPM\x00\x00" + b[8:],  # another file
    ],
)
def test_a_damaged_file_is_a_one_line_error(tmp_path, damage) -> None:
    tiny(tmp_path, {"a": 0})
    path = tmp_path / FILENAME
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ModelFormatError) as err:
        SpmBackend.load(path)
    assert "\n" not in err.value.message and str(path) in err.value.message


# The real Gemma 3 vocabulary: 262,144 tokens, no merges in the file.


@pytest.fixture(scope="module")
def gemma_folder(gemma3_gguf: Path) -> Path:
    """The GGUF's converted folder in the user's store: tokenizer.json (transformers'
    converter) and tokenizer.spm side by side."""
    from llmopt.loader.load import hf_folder_for

    folder = hf_folder_for(gemma3_gguf, Store(REAL_HOME), Console(stderr=True))
    assert (folder / FILENAME).is_file()
    return folder


@pytest.fixture(scope="module")
def both(gemma_folder: Path) -> tuple[SpmBackend, HFBackend]:
    native = SpmBackend.load(gemma_folder / FILENAME)
    assert native is not None
    return native, HFBackend(gemma_folder / "tokenizer.json")


def _texts() -> list[str]:
    return texts(
        "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
        "<bos><bos>x<eos><pad><unused12>[multimodal]<table><tr>",
        "中文测试，你好世界。日本語のテキストです。مرحبا بالعالم",  # noqa: RUF001
        "emoji 😀🫠🧑‍🚀, rare 𓀀 \U0010fffd \x00\x01, the marker itself: ▁ ▁▁ x▁y",
        "<0x41> is not a byte when written",
    )


def test_gemma3_ids_match_transformers(both) -> None:
    assert_same_ids_and_text(*both, _texts())


def test_gemma3_decode_matches_transformers_on_random_ids(both) -> None:
    native, hf = both
    rnd = random.Random(0)
    bytes_ = [native.token_to_id(b) for b in BYTES]
    for _ in range(2000):
        ids = [
            rnd.choice([rnd.randrange(262_144), rnd.choice(bytes_), rnd.randrange(300)])
            for _ in range(rnd.randint(0, 10))
        ]
        assert native.decode(ids) == hf.decode(ids), ids


def test_gemma3_100kb_encodes_fast(both) -> None:
    assert_100kb_encodes_fast(*both)  # about 20 ms


def test_gemma3_tokenizer_uses_the_native_file(gemma_folder: Path, both) -> None:
    tok = Tokenizer(gemma_folder)
    assert isinstance(tok._tk, SpmBackend)
    assert tok.vocab_size == 262_144 and (tok.bos_id, tok.eos_id) == (2, 1)
    assert tok.encode("Hi") == [2, *both[1].encode("Hi")]
    assert tok.same_vocabulary(Tokenizer(gemma_folder))


def test_gemma3_ids_match_llama_cpp(gemma3_gguf: Path, both) -> None:
    """llama.cpp agrees but where runs of spaces are concerned: it matches them whole in
    the raw text as user-defined tokens, where transformers merges the U+2581 they
    become like any other token. So a run longer than the longest (31) splits otherwise
    (77 spaces: 31 + 31 + 15 there, 16 + 16 + 16 + 29 here), and a U+2581 written in
    the text joins the spaces around it only here. We follow transformers."""
    llama_cpp = pytest.importorskip("llama_cpp")
    native, _ = both
    ref = llama_cpp.Llama(str(gemma3_gguf), vocab_only=True, verbose=False)
    for text in _texts()[:16]:
        if " " * 32 in text or "\u2581" in text:
            continue
        assert native.encode(text) == ref.tokenize(text.encode(), add_bos=False, special=True)


def test_an_older_converted_folder_gets_the_files_it_lacks(smollm_gguf: Path) -> None:
    """A folder converted before the format file existed is read again for its tokenizer
    (only: its weights stay), then marked; SmolLM2's byte-level vocabulary gets its
    tokenizer.bpe there (format 3), and no tokenizer.spm."""
    from llmopt.loader.converted_format import FORMAT, FORMAT_FILE, format_of
    from llmopt.loader.load import hf_folder_for

    store = Store()  # the test's own home (conftest's isolated_home)
    folder = hf_folder_for(smollm_gguf, store, Console(stderr=True))
    assert format_of(folder) == FORMAT and (folder / BPE_FILENAME).is_file()
    assert not (folder / FILENAME).exists()
    (folder / FORMAT_FILE).unlink()
    (folder / BPE_FILENAME).unlink()
    config_written = (folder / "config.json").stat().st_mtime_ns
    assert format_of(folder) == 1
    hf_folder_for(smollm_gguf, store, Console(stderr=True))
    assert format_of(folder) == FORMAT and (folder / BPE_FILENAME).is_file()
    assert (folder / "config.json").stat().st_mtime_ns == config_written


def test_only_gemma_style_vocabularies_get_the_native_file() -> None:
    from llmopt.loader.gguf_tokenizer import spm_vocabulary

    meta = {
        "general.architecture": "gemma3",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": ["<unk>", "<bos>", "  ", "\n", "a"],
        "tokenizer.ggml.token_type": [2, 3, 4, 4, 1],
        "tokenizer.ggml.unknown_token_id": 0,
    }
    vocab = spm_vocabulary(meta)
    assert vocab is not None
    assert vocab.tokens == ["<unk>", "<bos>", "▁▁", "\n", "a"]
    assert vocab.flags == [0, ADDED | SPECIAL, 0, ADDED, 0]
    assert vocab.scores == [0.0, -1.0, -2.0, -3.0, -4.0]
    assert spm_vocabulary({**meta, "general.architecture": "llama"}) is None
    assert spm_vocabulary({**meta, "tokenizer.ggml.model": "gpt2"}) is None


def test_sentencepiece_files_stay_version_1(tmp_path) -> None:
    """What llmopt read before the byte-level kind came: a store shared with an older
    llmopt keeps working."""
    tiny(tmp_path, {"a": 0})
    assert (tmp_path / FILENAME).read_bytes()[8:12] == (1).to_bytes(4, "little")
