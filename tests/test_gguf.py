"""GGUF reading: dequantization, the q/k permutation, metadata, and agreement with the
Hugging Face folder the file was made from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGUFWriter
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as reference_dequantize
from gguf.quants import quantize
from rich.console import Console

from llmopt.device import resolve_dtype
from llmopt.errors import ModelFormatError
from llmopt.kernels import qgemv
from llmopt.kernels.build import c_compiler
from llmopt.layers.embedding import QuantEmbedding
from llmopt.layers.quant_linear import QuantLinear, use_exact_arithmetic
from llmopt.loader.dequant import dequantize, quantized_weight
from llmopt.loader.gguf import GGUFFile
from llmopt.loader.gguf_weights import INDEX, unpermute
from llmopt.loader.load import load_model, open_source
from llmopt.store.store import Store
from llmopt.weights import gguf_blocks
from llmopt.weights.qweight import QuantizedWeight
from tests.conftest import REAL_HOME, require_kernel, write_tiny_model
from tests.test_parity import full_logits

K_QUANTS = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
# Where each K-quant block keeps its fp16 super-block scales (d, and dmin where it has one).
_K_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def _blocks(qtype: Q, rows: int, n: int, seed: int = 0) -> np.ndarray:
    """A (rows, n) tensor's bytes in qtype: quantized by the gguf package where it can;
    K-quants (which it only decodes) as random blocks with sane fp16 scales, one
    sub-block of each row's first block at scale 0."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, n)).astype(np.float32)
    if qtype not in K_QUANTS:
        w[3, 32:64] = 0.25  # a constant block: Q4_1 stores it with d = 0
        return quantize(w, qtype)
    size, per = GGML_QUANT_SIZES[qtype][1], GGML_QUANT_SIZES[qtype][0]
    raw = rng.integers(0, 256, (rows * n // per, size), dtype=np.uint8)
    for at in _K_SCALES[qtype]:
        d = rng.uniform(1e-3, 1e-2, len(raw)).astype(np.float16)
        raw[:, at : at + 2] = d.view(np.uint8).reshape(-1, 2)
    if qtype == Q.Q6_K:
        raw[:, 192:208] |= 1  # int8 scales: none 0 by chance
    if qtype == Q.Q3_K:
        raw[:, 96:104] |= 0x11  # odd 6-bit scales: none 32 (scale 0) by chance
    first = raw[:: n // per]
    if qtype == Q.Q6_K:
        first[:, 192] = 0  # sub-block 0's int8 scale
    elif qtype == Q.Q2_K:
        first[:, 0] &= 0xF0  # sub-block 0's 4-bit scale
    elif qtype == Q.Q3_K:  # sub-block 0's 6-bit scale 32: low nibble 0, high bits 2
        first[:, 96] &= 0xF0
        first[:, 104] = (first[:, 104] & 0xFC) | 2
    else:
        first[:, 4] &= 0xC0  # sub-block 0's 6-bit scale (its high bits serve sub-block 4)
    return raw.reshape(rows, -1)


BLOCK_TYPES = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, *K_QUANTS, Q.MXFP4]


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, *BLOCK_TYPES])
def test_dequantize_matches_gguf_reference(qtype) -> None:
    raw = _blocks(qtype, 64, 512)
    expected = reference_dequantize(raw, qtype).reshape(64, 512)
    got = dequantize(raw, qtype, (64, 512))
    assert torch.equal(got, torch.from_numpy(expected.astype(np.float32)))


def _llama_cpp_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    # What llama.cpp's converter does to Llama q/k rows (pairs interleaved per head).
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    w = torch.randn(4 * 16, 8)
    assert torch.equal(unpermute(_llama_cpp_permute(w, 4), 4), w)
    b = torch.randn(4 * 16)
    assert torch.equal(unpermute(_llama_cpp_permute(b, 4), 4), b)


_GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}


def write_gguf(
    folder: Path,
    out: Path,
    smollm_gguf: Path,
    qtype: Q = Q.F32,
    types: dict[str, Q] | None = None,
    arch: str = "llama",
) -> None:
    """Write a Hugging Face folder as a GGUF of `arch` (llama or qwen3) the way llama.cpp's
    converter lays it out, its matrices in qtype, or in types[kind] for the GGUF tensor
    kinds named there."""
    from safetensors.torch import load_file

    from llmopt.loader.hf import read_config

    cfg = read_config(folder)
    hf = load_file(str(folder / "model.safetensors"))
    vocab = GGUFFile(smollm_gguf)
    w = GGUFWriter(str(out), arch)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(vocab.meta["tokenizer.ggml.tokens"])
    w.add_token_types(vocab.meta["tokenizer.ggml.token_type"])
    w.add_token_merges(vocab.meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(vocab.meta["tokenizer.chat_template"])
    for name, t in hf.items():
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            gname = f"blk.{i}.{_GGUF_NAMES[rest.rsplit('.', 1)[0]]}.weight"
        kind = gname.removesuffix(".weight").rsplit(".", 1)[-1]
        if arch == "llama" and kind in ("attn_q", "attn_k"):
            t = _llama_cpp_permute(t, cfg.num_heads if kind == "attn_q" else cfg.num_kv_heads)
        data = t.float().numpy()
        dtype = (types or {}).get(kind, qtype)
        if data.ndim == 2 and dtype != Q.F32:
            w.add_tensor(gname, quantize(data, dtype), raw_dtype=dtype)
        else:
            w.add_tensor(gname, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_gguf_and_hf_folder_loads_agree(tmp_path, smollm_folder, smollm_gguf, arch) -> None:
    # Qwen3's q/k rows are stored as they are (unlike Llama's), beside their norms.
    extra = {"head_dim": 32, "random_norms": True} if arch == "qwen3" else {}
    folder = write_tiny_model(tmp_path / "tiny", smollm_folder, arch=arch, **extra)
    gguf_path = tmp_path / "tiny.gguf"
    write_gguf(folder, gguf_path, smollm_gguf, arch=arch)
    console, store = Console(stderr=True), Store()
    from_hf = load_model(folder, torch.float32, torch.device("cpu"), store, console)
    from_gguf = load_model(
        gguf_path, torch.float32, torch.device("cpu"), store, console, dequantize=True
    )
    assert from_gguf.config.num_kv_heads == from_hf.config.num_kv_heads
    # An F32 file has no blocks for the int kernels: dense, bf16 activations by default.
    assert not open_source(gguf_path, torch.device("cpu"), store, console).runs_quantized
    ids = list(range(500, 530))
    diff = (full_logits(from_hf, ids) - full_logits(from_gguf, ids)).abs().max().item()
    assert diff < 1e-4
    # The converted copy is reused: a second load does not read the metadata again, and
    # loading writes no dense copy of the weights (they are read from the file).
    converted = store.converted_dir(gguf_path)
    stamp = (converted / "config.json").stat().st_mtime_ns
    load_model(gguf_path, torch.float32, torch.device("cpu"), store, console)
    assert (converted / "config.json").stat().st_mtime_ns == stamp
    assert not (converted / "model.safetensors").exists()


# The grid each block type runs on: bits of its codes, inputs per group, and the integer
# zero point of the symmetric ones.
GRIDS = {
    Q.Q8_0: (8, 32, 128),
    Q.Q4_0: (4, 32, 8),
    Q.Q5_0: (5, 32, 16),
    Q.Q6_K: (6, 16, 32),
    Q.Q4_1: (4, 32, None),
    Q.Q5_1: (5, 32, None),
    Q.Q4_K: (4, 32, None),
    Q.Q2_K: (4, 16, None),
    Q.Q3_K: (4, 16, 4),
    Q.Q5_K: (5, 32, None),
    Q.MXFP4: (4, 32, 12),  # e2m1 nibbles, the integers 0..24 of the e2m1 codebook
}


@pytest.mark.parametrize("qtype", BLOCK_TYPES)
def test_quantized_blocks_hold_the_dequantized_weights(qtype) -> None:
    raw = _blocks(qtype, 64, 512)
    qw = quantized_weight(raw, qtype, (64, 512))
    dense = dequantize(raw, qtype, (64, 512))
    bits, group, zero = GRIDS[qtype]
    assert (qw.bits, qw.group_size) == (bits, group)
    assert int(qw.q.max()) < 2**qw.bits
    if zero is None:  # a float minimum: fractional zero points, to fp32 rounding
        torch.testing.assert_close(qw.dequantize(), dense, rtol=1e-6, atol=1e-6)
        with pytest.raises(ValueError, match="fractional"):
            qw.integer_zero()  # no checkpoint layout can store them
    else:
        assert torch.equal(qw.dequantize(), dense)
        flat = 1 if qtype in K_QUANTS else 0  # a group at scale 0 becomes zero 0, scale 1
        assert torch.equal(qw.integer_zero()[:, flat:], torch.full((64, 512 // group - flat), zero))
    if qtype == Q.Q4_1:
        assert qw.dequantize()[3, 32:64].eq(0.25).all()
    if qtype in K_QUANTS:  # the sub-block at scale 0: its offset alone
        assert torch.equal(qw.dequantize()[:, :group], dense[:, :group])


@pytest.mark.parametrize("qtype", BLOCK_TYPES)
def test_block_types_run_on_the_int_kernels(qtype) -> None:
    """Each type's QuantLinear takes qgemv at the type's own bits (int8 activations:
    close to the dense product, not equal), and its embedding lookups are the dense
    rows."""
    require_kernel(qgemv.load())
    raw = _blocks(qtype, 48, 512, seed=1)
    dense = dequantize(raw, qtype, (48, 512))
    layer = QuantLinear(quantized_weight(raw, qtype, (48, 512)), None, torch.device("cpu"))
    assert layer.kernel == "qgemv"
    assert layer.wq.numel() == 48 * 512 * GRIDS[qtype][0] // 8
    x = torch.randn(5, 512)
    want = x @ dense.T
    assert ((layer(x) - want).norm() / want.norm()).item() < 0.02
    ids = torch.tensor([0, 47, 3, 3, 20])
    # fp32 rounding of the offsets (int8's are scale * (128 - zero) for codes q - 128)
    atol = 1e-6 * dense.abs().max().item()
    torch.testing.assert_close(QuantEmbedding(layer)(ids), dense[ids], rtol=0, atol=atol)


def test_fused_parts_on_different_grids_share_the_finest() -> None:
    """q/k in Q5_0 and v in Q6_K fuse on int8 group 16, the same weights; Q5_0 beside
    Q4_K on int5 group 32."""
    cpu = torch.device("cpu")
    parts = [
        quantized_weight(_blocks(t, 32, 512, i), t, (32, 512))
        for i, t in enumerate([Q.Q5_0, Q.Q4_K, Q.Q6_K])
    ]
    fused = QuantizedWeight.cat([p.regrid(8, 16) for p in parts])
    assert (fused.bits, fused.group_size) == (8, 16)
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))
    assert QuantLinear(fused, None, cpu).kernel in ("qgemv", None)
    with pytest.raises(ValueError, match="finer grid"):
        parts[2].regrid(8, 32)
    five = QuantizedWeight.cat([p.regrid(5, 32) for p in parts[:2]])
    assert torch.equal(five.dequantize(), torch.cat([p.dequantize() for p in parts[:2]]))
    assert QuantLinear(five, None, cpu).kernel in ("qgemv", None)


def test_gguf_blocks_run_as_stored(tmp_path, smollm_folder, smollm_gguf) -> None:
    """A GGUF's Q4_1/Q8_0 linears load as QuantLinears (a tied head and the embedding
    one, in the embedding's blocks), parts of one fused matrix in different types on
    the finer grid; the dequantized path of those linears is the dequantized model,
    and the int kernels stay close to it."""
    folder = write_tiny_model(tmp_path / "tiny", smollm_folder, tie_word_embeddings=True)
    gguf_path = tmp_path / "tiny.gguf"
    write_gguf(folder, gguf_path, smollm_gguf, Q.Q4_1, {"token_embd": Q.Q8_0, "attn_v": Q.Q8_0})
    console, store, cpu = Console(stderr=True), Store(), torch.device("cpu")
    dense = load_model(gguf_path, torch.float32, cpu, store, console, dequantize=True)
    blocks = load_model(gguf_path, torch.float32, cpu, store, console)
    model = blocks.model
    assert not blocks.config.tie_word_embeddings and dense.config.tie_word_embeddings
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.bits == 8
    if model.lm_head.kernel == "qgemv":  # lookups in the head's own blocks
        assert isinstance(model.embed_tokens, QuantEmbedding)
        assert model.embed_tokens.table is model.lm_head
    assert isinstance(model.layers[0].mlp.gate_up_proj, QuantLinear)
    assert model.layers[0].mlp.gate_up_proj.bits == 4
    qkv = model.layers[0].self_attn.qkv_proj  # Q4_1 q/k beside Q8_0 v: all on int8
    assert isinstance(qkv, QuantLinear) and (qkv.bits, qkv.group_size) == (8, 32)
    ids = list(range(500, 530))
    want = full_logits(dense, ids)
    kernels = full_logits(blocks, ids)
    use_exact_arithmetic(model)  # the dense path: dequantized blocks in fp32
    assert (full_logits(blocks, ids) - want).abs().max().item() < 1e-4
    # The int kernels round activations to int8 per 64 inputs (as llama.cpp's Q8 blocks do):
    # close to the dense model's logits, and not equal (the kernels ran; without a C
    # compiler the layers fall back to dense arithmetic).
    assert ((kernels - want).norm() / want.norm()).item() < 0.04
    if c_compiler() is not None:
        assert model.lm_head.kernel == "qgemv" and not torch.equal(kernels, want)
    # Later loads read the tensors through the conversion cache's index; one is written
    # for a cache that predates it.
    index = store.converted_dir(gguf_path) / INDEX
    index.unlink()
    again = load_model(gguf_path, torch.float32, cpu, store, console)
    assert index.is_file()
    assert torch.equal(full_logits(again, ids), kernels)


def test_an_mxfp4_gguf_runs_packed(tmp_path, smollm_folder, smollm_gguf) -> None:
    """A GGUF whose linears are MXFP4 loads them as FP4 QuantLinears on the packed
    kernel (q/k/v fused as they are), close to the dequantized model's logits, and
    equal to them on the dense path."""
    folder = write_tiny_model(tmp_path / "tiny", smollm_folder)
    gguf_path = tmp_path / "tiny.gguf"
    write_gguf(folder, gguf_path, smollm_gguf, Q.MXFP4, {"token_embd": Q.F32})
    console, store, cpu = Console(stderr=True), Store(), torch.device("cpu")
    dense = load_model(gguf_path, torch.float32, cpu, store, console, dequantize=True)
    blocks = load_model(gguf_path, torch.float32, cpu, store, console)
    qkv = blocks.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, QuantLinear) and (qkv.codebook, qkv.group_size) == ("e2m1", 32)
    if c_compiler() is not None:
        assert qkv.kernel == "qgemv"
    ids = list(range(500, 530))
    want = full_logits(dense, ids)
    kernels = full_logits(blocks, ids)
    assert ((kernels - want).norm() / want.norm()).item() < 0.04
    use_exact_arithmetic(blocks.model)
    assert (full_logits(blocks, ids) - want).abs().max().item() < 1e-4


def test_quantized_models_default_to_fp32_activations(tmp_path, smollm_gguf, smollm_folder) -> None:
    """--dtype auto: fp32 where the linears run on the CPU's int kernels (no speed to
    gain from bf16 there), bf16 for dense weights and for --dequantize."""
    cpu, store, console = torch.device("cpu"), Store(REAL_HOME), Console(stderr=True)
    assert open_source(smollm_gguf, cpu, store, console).runs_quantized
    assert not open_source(smollm_gguf, cpu, store, console, dequantize=True).runs_quantized
    assert resolve_dtype("auto", cpu, quantized=True) == torch.float32
    assert resolve_dtype("auto", cpu) == torch.bfloat16
    assert resolve_dtype("bfloat16", cpu, quantized=True) == torch.bfloat16  # as asked
    folder = tmp_path / "ckpt"
    folder.mkdir()
    cfg = json.loads((smollm_folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq"}
    (folder / "config.json").write_text(json.dumps(cfg))
    assert open_source(folder, cpu, store, console).runs_quantized


def test_a_quantized_head_writes_fp32_logits(smollm_gguf) -> None:
    """Logits of 16-32 in bf16 are rounded to steps of 1/8: the int8 head writes fp32."""
    loaded = load_model(
        smollm_gguf, torch.bfloat16, torch.device("cpu"), Store(REAL_HOME), Console(stderr=True)
    )
    hidden = torch.randn(3, loaded.config.hidden_size, dtype=torch.bfloat16)
    logits = loaded.model.logits(hidden)
    assert logits.dtype == torch.float32
    assert not torch.equal(logits, logits.to(torch.bfloat16).float())
    assert torch.equal(logits.to(torch.bfloat16), loaded.model.lm_head(hidden))


def test_smollm_metadata(smollm_gguf) -> None:
    g = GGUFFile(smollm_gguf)
    cfg = g.hf_config()
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_key_value_heads"]) == (
        30,
        576,
        3,
    )
    assert cfg["tie_word_embeddings"] is True
    assert cfg["rms_norm_eps"] == 1e-5
    tok = g.tokenizer_config()
    assert (tok["bos_token"], tok["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert "<|im_start|>" in tok["chat_template"]


def test_tokenizer_splits_digits_like_llama_cpp(smollm_folder) -> None:
    from llmopt.tokenizer import Tokenizer

    tok = Tokenizer(smollm_folder)
    # The "smollm" pre-tokenizer puts every digit in its own token.
    ids = tok.encode("year 2024", add_bos=False)
    assert [tok.decode([i]) for i in ids][-4:] == ["2", "0", "2", "4"]
    text = "Hello, wörld! 🤖 <|im_start|>user\n  x = 12;"
    assert tok.decode(tok.encode(text, add_bos=False)) == text.replace("<|im_start|>", "")
    assert tok.token_id("<|im_start|>") in tok.encode(text, add_bos=False)


def test_chat_template_matches_transformers(smollm_folder) -> None:
    from transformers import AutoTokenizer

    from llmopt.tokenizer import Tokenizer

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Why?"},
    ]
    ref = AutoTokenizer.from_pretrained(smollm_folder)
    expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert Tokenizer(smollm_folder).apply_chat_template(messages) == expected


@pytest.mark.parametrize("damage", ["random", "truncated", "empty"])
def test_damaged_gguf_is_a_clear_error(tmp_path, smollm_gguf, damage) -> None:
    bad = tmp_path / "bad.gguf"
    if damage == "random":
        bad.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "truncated":
        bad.write_bytes(smollm_gguf.read_bytes()[:40_000_000])
    else:
        bad.write_bytes(b"")
    with pytest.raises(ModelFormatError, match=r"bad\.gguf"):
        load_model(bad, torch.float32, torch.device("cpu"), Store(), Console(stderr=True))
    assert not list((Store().home / "converted").glob("bad-*")), "no half-written conversion"


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_K, Q.Q6_K])
def test_big_matrices_decode_a_few_rows_at_a_time(monkeypatch, qtype) -> None:
    """Reading and decoding in chunks of rows (a partial one at the end) gives the
    weight decoding it whole does."""
    raw = _blocks(qtype, 64, 512, seed=3)
    whole = quantized_weight(raw, qtype, (64, 512))
    monkeypatch.setattr(gguf_blocks, "CHUNK_BYTES", raw.shape[1] * 5)  # 5 rows a chunk
    reads: list[tuple[int, int]] = []
    flat = raw.reshape(-1)

    def read(start: int, size: int) -> np.ndarray:
        reads.append((start, size))
        return flat[start : start + size]

    chunked = quantized_weight(read, qtype, (64, 512))
    assert len(reads) == 13 and reads[-1][1] == raw.shape[1] * 4
    for field in ("q", "scale", "zero"):
        assert torch.equal(getattr(whole, field), getattr(chunked, field))
    if qtype in gguf_blocks.K_TYPES:  # the K-quants' own factors too
        assert whole.kquant is not None and chunked.kquant is not None
        assert all(map(torch.equal, whole.kquant, chunked.kquant))


def test_our_type_numbers_are_the_gguf_packages() -> None:
    from llmopt.weights.ggml_types import GGMLType

    assert {t.name: int(t) for t in GGMLType} == {t.name: int(t) for t in Q}


def test_running_a_gguf_file_does_not_import_the_gguf_package(smollm_gguf: Path) -> None:
    """Once converted, a file loads through the store's index and our own block
    decoders: the gguf package's import (about 4 MB resident) stays out of a run, and
    the native byte-level tokenizer keeps `tokenizers` (about 19 MB) out too."""
    import subprocess
    import sys

    load_model(smollm_gguf, torch.float32, torch.device("cpu"), Store(REAL_HOME))  # converted
    code = (
        "import sys, torch\n"
        "from pathlib import Path\n"
        "from llmopt.loader.load import load_model\n"
        "from llmopt.store.store import Store\n"
        f"load_model(Path({str(smollm_gguf)!r}), torch.float32, torch.device('cpu'),"
        f" Store(Path({str(REAL_HOME)!r})))\n"
        "print(sorted(m for m in ('gguf', 'sentencepiece', 'yaml', 'tokenizers')"
        " if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
