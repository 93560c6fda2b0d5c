"""Gemma 3 against transformers: a tiny random model (local and global layers, a window
of 8 that the prompts outgrow) in one prefill and through the engine (batched, chunked
prefill, prefix cache, either attention backend), and the real Gemma 3 270M GGUF: its
config, tokenizer and greedy text."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmopt.engine.config import EngineConfig
from llmopt.engine.factory import build_engine
from llmopt.engine.llm import LLM
from llmopt.engine.sampling_params import SamplingParams
from llmopt.layers.attention_backend import TorchAttention
from llmopt.layers.native_attention import NativeCpuAttention
from llmopt.loader.load import LoadedModel, load_model
from llmopt.models.gemma3 import Gemma3ForCausalLM
from llmopt.store.store import Store
from tests.conftest import REAL_HOME, run_to_completion, write_tiny_model
from tests.test_parity import full_logits, ours, reference

WINDOW = 8
# Local, local, global, local: both kinds, and a global layer between local ones.
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]


def tiny_gemma(folder: Path, tokenizer_from: Path, **overrides) -> Path:
    settings = dict(
        arch="gemma3",
        num_hidden_layers=len(LAYER_TYPES),
        layer_types=LAYER_TYPES,
        sliding_window=WINDOW,
        head_dim=32,
        num_key_value_heads=1,
        query_pre_attn_scalar=24,  # not head_dim: the scale must come from the config
        tie_word_embeddings=True,
        random_norms=True,  # Gemma's norms multiply by 1 + w: w must not be all zeros
    )
    return write_tiny_model(folder, tokenizer_from, **{**settings, **overrides})


@pytest.fixture(scope="module")
def gemma_folder(tmp_path_factory, smollm_folder: Path) -> Path:
    return tiny_gemma(tmp_path_factory.mktemp("gemma") / "tiny-gemma3", smollm_folder)


def reference_greedy(ref, ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        # Scaled rotary on the global layers only, soft-capped logits, untied head.
        {
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
            "final_logit_softcapping": 5.0,
            "tie_word_embeddings": False,
        },
    ],
)
def test_tiny_gemma3_logits_match_transformers(tmp_path, smollm_folder, overrides) -> None:
    folder = tiny_gemma(tmp_path / "tiny", smollm_folder, **overrides)
    mine, ref = ours(folder), reference(folder)
    assert isinstance(mine.model, Gemma3ForCausalLM)
    assert mine.model.native_decode is None  # fp32 dense weights: oneDNN's, the loop
    ids = list(range(300, 340))  # five windows long
    with torch.inference_mode():
        expected = ref(torch.tensor([ids])).logits[0].float()
    assert (full_logits(mine, ids) - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_tiny_gemma3_engine_matches_transformers(gemma_folder, backend, monkeypatch) -> None:
    """Prompts of 13 to 40 tokens (two sharing a 32-token prefix), generated together in
    prefill chunks of 7 tokens, then again from the prefix cache: each one's greedy
    tokens are transformers' for it alone."""
    if backend == "torch":
        monkeypatch.setattr(NativeCpuAttention, "load", classmethod(lambda cls, avx2=False: None))
    shared = list(range(1000, 1032))
    prompts = [[*shared, 5, 6, 7, 8], list(range(300, 313)), [*shared, 9], list(range(50, 90))]
    ref = reference(gemma_folder)
    expected = [reference_greedy(ref, p, 12) for p in prompts]
    llm = LLM(gemma_folder, device="cpu", dtype="float32", max_num_batched_tokens=7)
    attn = llm.loaded.model.layers[0].self_attn.backend
    assert type(attn) is (TorchAttention if backend == "torch" else NativeCpuAttention)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    assert [c.token_ids for c in llm.generate(prompts, params)] == expected
    again = llm.generate([prompts[0], prompts[2], prompts[3]], params)
    assert [c.token_ids for c in again] == [expected[0], expected[2], expected[3]]
    assert [c.stats.cached_prompt_tokens for c in again] == [32, 32, 32]  # whole blocks


def test_multimodal_checkpoint_runs_its_text_decoder(tmp_path, smollm_folder) -> None:
    """A Gemma3ForConditionalGeneration folder (vision tower and all): its text decoder
    alone, with the logits transformers gives for text without images."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    text = dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, num_hidden_layers=len(LAYER_TYPES),
        layer_types=LAYER_TYPES, sliding_window=WINDOW, max_position_embeddings=512,
        initializer_range=0.2,
    )  # fmt: skip
    vision = SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        image_size=28, patch_size=14,
    )  # fmt: skip
    cfg = Gemma3Config(
        text_config=text, vision_config=vision.to_dict(), mm_tokens_per_image=4,
        image_token_index=49151, boi_token_index=49150, eoi_token_index=49149,
    )  # fmt: skip
    torch.manual_seed(0)
    ref = Gemma3ForConditionalGeneration(cfg).float().eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    folder = tmp_path / "tiny-gemma3-mm"
    ref.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((smollm_folder / name).read_bytes())
    mine = ours(folder)
    ids = list(range(300, 330))
    with torch.inference_mode():
        expected = ref(input_ids=torch.tensor([ids])).logits[0].float()
    assert (full_logits(mine, ids) - expected).abs().max().item() < 1e-4


# The real model: prompts whose greedy continuations have no near ties (a top-2 logit
# margin of at least 0.15 at each of the 24 steps in fp32, measured when they were
# chosen; the two implementations' logits differ by about 1e-4).
REAL_PROMPTS = [
    "def fibonacci(n):\n    ",
    "Water boils at",
    "The largest planet in the solar system is",
]
REAL_TOKENS = 24


@pytest.fixture(scope="module")
def gemma_270m(gemma3_gguf: Path) -> LoadedModel:
    """The 270M model dequantized to fp32 (the conversion cached in the user's store)."""
    cpu = torch.device("cpu")
    return load_model(gemma3_gguf, torch.float32, cpu, Store(REAL_HOME), dequantize=True)


@pytest.fixture(scope="module")
def gemma_270m_reference(gemma3_gguf: Path):
    """transformers' Gemma 3 with the weights its own GGUF reader makes of the file.
    (from_pretrained(gguf_file=...) does the same but needs accelerate.)"""
    from transformers import AutoConfig, Gemma3ForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = AutoConfig.from_pretrained(gemma3_gguf.parent, gguf_file=gemma3_gguf.name)
    with no_init_weights():  # every weight comes from the file: skip 5 s of random init
        model = Gemma3ForCausalLM(cfg).eval()
    tensors = load_gguf_checkpoint(str(gemma3_gguf), return_tensors=True, model_to_load=model)
    model.load_state_dict(tensors["tensors"], strict=False)
    model.tie_weights()
    return model


def test_gemma3_270m_config(gemma_270m) -> None:
    cfg = gemma_270m.config
    assert cfg.architecture == "Gemma3ForCausalLM" and cfg.tie_word_embeddings
    assert (cfg.num_layers, cfg.hidden_size, cfg.head_dim, cfg.num_kv_heads) == (18, 640, 256, 1)
    globals_ = [i for i in range(18) if cfg.layer_window(i) is None]
    assert globals_ == [5, 11, 17] and cfg.sliding_window == 512
    assert (cfg.rope_theta, cfg.local_rope_theta) == (1e6, 1e4)
    assert cfg.attention_scale == 256**-0.5 and cfg.final_logit_softcap is None


def test_gemma3_270m_greedy_text_matches_transformers(gemma_270m, gemma_270m_reference) -> None:
    tok = gemma_270m.tokenizer
    prompts = [tok.encode(p) for p in REAL_PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=REAL_TOKENS, ignore_eos=True)
    engine = build_engine(gemma_270m, EngineConfig(max_context=512, kv_cache_memory=0.05))
    got = run_to_completion(engine, prompts, params)
    expected = [reference_greedy(gemma_270m_reference, p, REAL_TOKENS) for p in prompts]
    assert [tok.decode(g) for g in got] == [tok.decode(e) for e in expected]
    assert got == expected


def test_gemma3_270m_tokenizer_matches_transformers(gemma_270m, gemma3_gguf) -> None:
    """The vocabulary built from the GGUF encodes and decodes as transformers' tokenizer
    of the same file, the BOS included; the file has no chat template, so a chat is
    the plain transcript, after the BOS."""
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(gemma3_gguf.parent, gguf_file=gemma3_gguf.name)
    tok = gemma_270m.tokenizer
    texts = [
        "Hello world: the object's __init__ method, 1234 ünïcödé",
        "  leading spaces,\ttabs\nand new lines\n\n",
        "<start_of_turn>user\nHi<end_of_turn>\n",  # special tokens written in the text
        "emoji 🙂 and 日本語",
    ]
    for text in texts:
        ids = tok.encode(text)
        assert ids == ref(text).input_ids
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert tok.chat_template is None and ref.chat_template is None
    chat = tok.encode_chat([{"role": "user", "content": "What is 2 + 2?"}])
    assert chat == ref("User: What is 2 + 2?\n\nAssistant:").input_ids
