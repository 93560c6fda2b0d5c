"""GGUF export: llama.cpp runs the files and agrees with llmopt's own greedy output,
llmopt's reader gets the config and weights back, and failures leave no file."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from llmopt import LLM, SamplingParams
from llmopt.bench.decode import open_llama as bench_open_llama
from llmopt.errors import ModelFormatError, UsageError
from llmopt.loader.gguf import GGUFFile
from llmopt.loader.hf import read_tensors
from llmopt.models.scoring import Scorer
from llmopt.quant import gguf_export
from llmopt.quant.gguf_export import export_gguf
from tests.conftest import write_tiny_model

MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in 3 words."}]
PROMPT = "The capital of France is"
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
SMALL_VOCAB = 1024


def small_tiny_model(folder: Path, smollm_folder: Path, **overrides) -> Path:
    """A tiny random model with SmolLM2's tokenizer cut to its first 1024 tokens: gguf's
    reader parses token strings one at a time, seconds for the full 49152."""
    write_tiny_model(folder, smollm_folder, vocab_size=SMALL_VOCAB, **overrides)
    path = folder / "tokenizer.json"
    tok = json.loads(path.read_text())
    vocab = {t: i for t, i in tok["model"]["vocab"].items() if i < SMALL_VOCAB}
    merges = tok["model"]["merges"]
    tok["model"]["vocab"] = vocab
    tok["model"]["merges"] = [m for m in merges if all(p in vocab for p in (*m, "".join(m)))]
    path.write_text(json.dumps(tok))
    return folder


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory, smollm_folder: Path) -> Callable[[str], Path]:
    """SmolLM2 exported to a type, once per type for the whole module."""
    out = tmp_path_factory.mktemp("gguf")
    done: dict[str, Path] = {}

    def get(qtype: str) -> Path:
        if qtype not in done:
            done[qtype] = export_gguf(smollm_folder, out / f"{qtype}.gguf", qtype, threads=2)
        return done[qtype]

    return get


@pytest.fixture(scope="module")
def smollm_llm(smollm_folder: Path) -> LLM:
    return LLM(smollm_folder, device="cpu", dtype="fp32", kv_cache_memory=0.05)


@pytest.fixture(scope="module")
def chat_prompt(smollm_llm: LLM) -> tuple[list[int], list[int]]:
    """(prompt ids, llmopt's greedy continuation) for a chat turn."""
    ids = smollm_llm.loaded.tokenizer.encode_chat(MESSAGES)
    return ids, smollm_llm.generate([ids], GREEDY)[0].token_ids


def open_llama(path: Path, **kwargs):
    """llama.cpp's reading of the file, repacking off: its plain CPU path, the same on
    every machine (its repacked AMX path dies on AMX machines: bench.decode.open_llama)."""
    pytest.importorskip("llama_cpp")
    return bench_open_llama(path, False, **kwargs)


def llama_cpp_greedy(path: Path, prompt: list[int], n: int = 16) -> list[int]:
    model = open_llama(path, n_ctx=256, n_threads=2, logits_all=False)
    out: list[int] = []
    for token in model.generate(prompt, temp=0.0, top_k=1):
        out.append(token)
        if len(out) == n:
            break
    model.close()
    return out


@pytest.mark.parametrize("qtype", ["Q8_0", "F16"])
def test_llama_cpp_greedy_matches_llmopt(qtype, export, smollm_llm, chat_prompt) -> None:
    pytest.importorskip("llama_cpp")
    path = export(qtype)
    vocab = open_llama(path, vocab_only=True)
    tok = smollm_llm.loaded.tokenizer
    # Same vocabulary, merges, pre-tokenizer split and special tokens on both sides.
    for text in (PROMPT, "Digits 12345, ÜTF-8 ünïcödé\n\n  tabs\tand 'quotes'"):
        assert vocab.tokenize(text.encode(), add_bos=False) == tok.encode(text, add_bos=False)
    prompt, expected = chat_prompt
    chat = tok.apply_chat_template(MESSAGES).encode()
    assert vocab.tokenize(chat, add_bos=False, special=True) == prompt
    vocab.close()
    assert llama_cpp_greedy(path, prompt) == expected


def test_q4_k_m_through_llama_cpp_is_smaller_and_runs(export, chat_prompt) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    path = export("Q4_K_M")
    assert path.stat().st_size < export("Q8_0").stat().st_size
    vocab = open_llama(path, vocab_only=True)
    assert vocab.metadata["general.file_type"] == str(llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M)
    vocab.close()
    prompt, expected = chat_prompt
    # 4 bits change a 135M model's choices within a few tokens; the first must survive.
    assert llama_cpp_greedy(path, prompt, 2)[0] == expected[0]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no scratch left


def test_mxfp4_runs_in_llama_cpp_as_in_llmopt(export, chat_prompt) -> None:
    """An MXFP4 export (FP4 linears, the 8-bit embedding of 4-bit files): llama.cpp's
    greedy chat turn is llmopt's on the same file, run packed, and starts as the
    full-precision model's."""
    llama_cpp = pytest.importorskip("llama_cpp")
    path = export("MXFP4")
    gguf = GGUFFile(path)
    types = {t.name: t.tensor_type for t in gguf.reader.tensors}
    assert types["blk.0.attn_q.weight"] == Q.MXFP4 and types["token_embd.weight"] == Q.Q8_0
    vocab = open_llama(path, vocab_only=True)
    assert vocab.metadata["general.file_type"] == str(llama_cpp.LLAMA_FTYPE_MOSTLY_MXFP4_MOE)
    vocab.close()
    prompt, expected = chat_prompt
    packed = LLM(path, device="cpu", dtype="fp32", kv_cache_memory=0.05)
    assert packed.loaded.model.layers[0].mlp.gate_up_proj.codebook == "e2m1"
    ours = packed.generate([prompt], GREEDY)[0].token_ids
    assert llama_cpp_greedy(path, prompt, 8) == ours[:8]
    assert ours[0] == expected[0]


def llama_cpp_last_logits(path: Path, prompt: list[int]) -> torch.Tensor:
    """llama.cpp's next-token logits after the prompt (V,), fp32."""
    import llama_cpp
    import numpy as np

    model = open_llama(path, n_ctx=256, n_threads=2, logits_all=False)
    model.eval(prompt)
    row = llama_cpp.llama_get_logits_ith(model._ctx.ctx, -1)
    logits = torch.from_numpy(np.ctypeslib.as_array(row, shape=(model.n_vocab(),)).copy())
    model.close()
    return logits


def test_nvfp4_runs_in_llama_cpp_as_in_llmopt(export, smollm_folder, chat_prompt) -> None:
    """An NVFP4 export: e4m3 scales per 16 weights in GGUF's blocks, each weight's tensor
    scale beside it as llama.cpp reads it (`.scale`, F32). Read back, its weights are the
    source's within FP4's rounding; llama.cpp and llmopt (packed) give the same next-token
    distribution on it. (Greedy text is no test here: this chat turn's first token is a
    near tie that either runtime's int8 activations can tip.)"""
    llama_cpp = pytest.importorskip("llama_cpp")
    path = export("NVFP4")
    gguf = GGUFFile(path)
    types = {t.name: t.tensor_type for t in gguf.reader.tensors}
    assert types["blk.0.attn_q.weight"] == Q.NVFP4 and types["token_embd.weight"] == Q.Q8_0
    assert types["blk.0.attn_q.scale"] == Q.F32 and types["blk.29.ffn_down.scale"] == Q.F32
    vocab = open_llama(path, vocab_only=True)
    assert vocab.metadata["general.file_type"] == str(llama_cpp.LLAMA_FTYPE_MOSTLY_NVFP4)
    vocab.close()
    name = "model.layers.3.mlp.down_proj.weight"
    source = read_tensors(smollm_folder)[name].float()
    back = gguf.hf_tensors()[name]  # dequantized, times its tensor scale
    assert ((back - source).norm() / source.norm()).item() < 0.15
    prompt, _ = chat_prompt
    packed = LLM(path, device="cpu", dtype="fp32", kv_cache_memory=0.05)
    assert packed.loaded.model.layers[0].mlp.gate_up_proj.codebook == "e2m1"
    ours = Scorer(packed.loaded.model, 256).logits(prompt)[-1].log_softmax(-1)
    theirs = llama_cpp_last_logits(path, prompt).double().log_softmax(-1)
    kl = (ours.exp() * (ours - theirs.float())).sum().item()
    top = ours.topk(5).indices  # measured: KL 0.010, the top 5 within 0.2 nats
    assert kl < 0.03, kl
    assert (ours[top] - theirs[top].float()).abs().max().item() < 0.5


@pytest.mark.parametrize("qtype,tol", [("F32", 0.0), ("F16", 1e-3)])
def test_llmopt_reader_gets_config_and_weights_back(qtype, tol, tmp_path, smollm_folder) -> None:
    folder = small_tiny_model(tmp_path / "tiny", smollm_folder)
    gguf = GGUFFile(export_gguf(folder, tmp_path / "tiny.gguf", qtype))
    source = json.loads((folder / "config.json").read_text())
    back = gguf.hf_config()
    common = set(source) & set(back)
    assert {"hidden_size", "num_key_value_heads", "rms_norm_eps"} <= common
    assert {k: back[k] for k in common} == {k: source[k] for k in common}
    tensors = gguf.hf_tensors()
    expected = read_tensors(folder)
    assert tensors.keys() == expected.keys()
    for name, w in expected.items():
        torch.testing.assert_close(tensors[name], w, atol=tol, rtol=tol)


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # untied output projection, permuted q/k
        {"arch": "qwen2"},  # q/k/v biases, no permutation
        {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    ],
    ids=["llama", "qwen2", "llama3-rope"],
)  # fmt: skip
def test_tiny_models_agree_with_llama_cpp(overrides, tmp_path, smollm_folder) -> None:
    pytest.importorskip("llama_cpp")
    folder = small_tiny_model(tmp_path / "tiny", smollm_folder, **overrides)
    path = export_gguf(folder, tmp_path / "tiny.gguf", "F32")
    llm = LLM(folder, device="cpu", dtype="fp32", kv_cache_memory=0.01)
    ids = llm.loaded.tokenizer.encode(PROMPT, add_bos=False)
    assert llama_cpp_greedy(path, ids) == llm.generate([ids], GREEDY)[0].token_ids


def test_4_bit_tensor_types_follow_llama_cpp(tmp_path, smollm_folder) -> None:
    folder = small_tiny_model(
        tmp_path / "tiny", smollm_folder, hidden_size=96, intermediate_size=200,
        tie_word_embeddings=True,
    )  # fmt: skip
    path = export_gguf(folder, tmp_path / "tiny.gguf", "Q4_0")
    gguf = GGUFFile(path)
    assert gguf.hf_config()["tie_word_embeddings"] is True
    types = {t.name: t.tensor_type for t in gguf.reader.tensors}
    assert types["blk.0.attn_q.weight"] == Q.Q4_0
    assert types["blk.0.ffn_down.weight"] == Q.F16  # rows of 200 are not whole blocks
    assert types["blk.0.attn_norm.weight"] == Q.F32
    # Tied embeddings are also the output projection, which keeps 8 bits.
    assert types["token_embd.weight"] == Q.Q8_0
    assert "output.weight" not in types
    if importlib.util.find_spec("llama_cpp"):
        assert len(llama_cpp_greedy(path, [100, 200, 300], 4)) == 4


def test_sentencepiece_vocabulary(tmp_path) -> None:
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("llama_cpp")
    from pydoc_data.topics import topics

    from transformers import AutoModelForCausalLM, LlamaConfig

    model = io.BytesIO()
    lines = "\n".join(list(topics.values())[:20]).splitlines()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=400, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, minloglevel=2,
    )  # fmt: skip
    folder = tmp_path / "spm"
    cfg = LlamaConfig(
        vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    path = export_gguf(folder, tmp_path / "spm.gguf", "F16")
    vocab = open_llama(path, vocab_only=True)
    text = "Hello world: the object's __init__ method, 1234 ünïcödé"
    expected = spm.SentencePieceProcessor(model_proto=model.getvalue()).encode(text)
    assert vocab.tokenize(text.encode(), add_bos=False) == expected


def test_unknown_type_lists_the_valid_ones(smollm_folder, tmp_path) -> None:
    with pytest.raises(UsageError, match="Q4_K_M"):
        export_gguf(smollm_folder, tmp_path / "x.gguf", "Q3_XL")


def test_unsupported_architecture(tmp_path, smollm_folder) -> None:
    # Gemma 3 runs (models/gemma3.py) but has no exporter.
    folder = tmp_path / "gemma3"
    folder.mkdir()
    raw = json.loads((smollm_folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "architectures": ["Gemma3ForCausalLM"]}))
    with pytest.raises(ModelFormatError, match=r"LlamaForCausalLM.*Qwen2ForCausalLM"):
        export_gguf(folder, tmp_path / "x.gguf", "Q8_0")


def test_k_quants_without_llama_cpp_say_what_to_install(
    tiny_llama, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes the import fail
    with pytest.raises(UsageError, match="pip install llama-cpp-python"):
        export_gguf(tiny_llama, tmp_path / "x.gguf", "Q4_K_M")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K_M"])
def test_failure_mid_write_leaves_no_file(qtype, tiny_llama, tmp_path, monkeypatch) -> None:
    if qtype == "Q4_K_M":
        pytest.importorskip("llama_cpp")
    quantize, calls = gguf_export.quantize, []

    def failing_quantize(data, qt):
        calls.append(qt)
        if len(calls) == 5:
            raise OSError("disk full")
        return quantize(data, qt)

    monkeypatch.setattr(gguf_export, "quantize", failing_quantize)
    out = tmp_path / "out" / "model.gguf"
    with pytest.raises(OSError, match="disk full"):
        export_gguf(tiny_llama, out, qtype)
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize(
    "qtype,method,order",
    [
        ("Q4_1", "gptq", []),
        ("Q4_0", "awq", []),
        ("MXFP4", "gptq", []),
        ("NVFP4", "gptq", []),  # with its tensor scales beside the blocks
        ("Q4_0", "gptq", ["--no-act-order"]),
    ],
)
def test_calibrated_gguf_holds_the_calibrated_codes(
    qtype, method, order, tmp_path, smollm_folder
) -> None:
    """--format gguf --method gptq|awq writes the codes that the same quantization puts in
    an llmopt checkpoint, on the type's grid (q/k rows in llama.cpp's order, scales in
    fp16), and llama.cpp runs the file. GPTQ's default there: act-order in static
    groups (the codes in input order)."""
    from typer.testing import CliRunner

    from llmopt.cli.main import app
    from llmopt.loader.quantized import unpack_checkpoint

    folder = small_tiny_model(tmp_path / "tiny", smollm_folder)  # untied, permuted q/k
    fp4 = qtype in ("MXFP4", "NVFP4")
    kind = ["--fp4", "--fp4-format", qtype.lower()] if fp4 else ["--int4"]
    common = [*kind, "--method", method, "--calib-tokens", "512", "--no-eval", *order]
    gguf = tmp_path / "c.gguf"
    args = [] if fp4 else ["--gguf-type", qtype]
    run = CliRunner().invoke
    r = run(app, ["quantize", str(folder), "--format", "gguf", *args, "-o", str(gguf), *common])
    assert r.exit_code == 0, r.stderr
    grid = {"Q4_0": ["--sym"], "Q4_1": ["--asym"]}.get(qtype, [])
    grid += [] if fp4 else ["--group-size", "32"]
    default_order = ["--act-order", "--static-groups"] if method == "gptq" else []
    grid += ["--bf16-embedding", *(order or default_order)]
    ckpt = tmp_path / "ckpt"
    r = run(app, ["quantize", str(folder), "-o", str(ckpt), *common, *grid])
    assert r.exit_code == 0, r.stderr
    qcfg = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    want = unpack_checkpoint(read_tensors(ckpt), qcfg)
    got = GGUFFile(gguf).hf_tensors(keep_quantized=True)
    types = {t.name: t.tensor_type for t in GGUFFile(gguf).reader.tensors}
    assert types["blk.0.attn_q.weight"] == Q[qtype] and types["blk.0.ffn_down.weight"] == Q[qtype]
    # MXFP4's default keeps the last layer's down_proj in int8: Q8_0 in the file, its
    # values within half a Q8_0 step of the checkpoint's (and the fp16 step's rounding,
    # up to 127 x 2^-11 of a step).
    wide = [f"{p}.weight" for p in qcfg.get("int8_linears", [])]
    assert wide == (["model.layers.1.mlp.down_proj.weight"] if qtype == "MXFP4" else [])
    if wide:
        assert types["blk.1.ffn_down.weight"] == Q.Q8_0
    for name in wide:
        w, g = want.pop(name).dequantize(), got[name].dequantize()
        step = w.abs().reshape(-1, 32).amax(1, keepdim=True) / 127
        assert ((g - w).reshape(-1, 32).abs() / step).max() <= 0.5 + 127 * 2**-11, name
    linears = [k for k in want if k.endswith("proj.weight")]
    assert len(linears) == 2 * 7 - len(wide)
    for name in linears:
        w, g = want[name], got[name]
        assert torch.equal(g.q, w.q), name
        step = w.scale.repeat_interleave(w.group_size, dim=1)  # fp16: under 1% of a step
        assert ((g.dequantize() - w.dequantize()).abs() / step).max() < 0.01, name
    if importlib.util.find_spec("llama_cpp"):
        assert len(llama_cpp_greedy(gguf, [100, 200, 300], 4)) == 4


@pytest.mark.parametrize(
    "args,message",
    [
        (["--gguf-type", "Q4_K_M"], "writes GGUF as Q4_0, Q4_1, MXFP4"),
        (["--gguf-type", "Q4_0", "--asym"], "Q4_0's grid is symmetric"),
        (["--group-size", "64"], "groups of 32"),
        (["--act-order", "--dynamic-groups"], "add --static-groups"),
    ],
)
def test_calibrated_gguf_bad_options_are_one_line_errors(args, message, tiny_llama) -> None:
    from typer.testing import CliRunner

    from llmopt.cli.main import app

    r = CliRunner().invoke(
        app, ["quantize", str(tiny_llama), "--int4", "--method", "gptq", "--format", "gguf",
              "--no-eval", *args],
    )  # fmt: skip
    assert r.exit_code == 2 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
