"""`llmopt bench MODEL --offline` and `--perplexity`: the in-process measurements."""

from __future__ import annotations

import json
import math

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from llmopt.cli.main import app as cli


def bench(*args: str):
    return CliRunner().invoke(cli, ["bench", *args])


def test_offline_pp_tg_batch(tiny_llama) -> None:
    r = bench(
        str(tiny_llama),
        "--offline",
        "--pp",
        "32",
        "--tg",
        "8",
        "--batch",
        "2",
        "--repeats",
        "2",
        "--dtype",
        "float32",
        "--json",
    )
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("pp32_tokens_per_s", "tg8_tokens_per_s", "batch2_tg8_tokens_per_s"):
        assert out[key]["mean"] > 0 and out[key]["std"] >= 0
    assert out["repeats"] == 2 and out["dtype"] == "float32"
    assert out["kv_cache"].startswith("fp32, ") and out["kv_cache_tokens"] > 0
    assert not any(k.startswith("spec_") for k in out)  # no speculation, no figures of it
    assert bench(str(tiny_llama), "--offline", "--pp", "4096").exit_code == 5  # too long


def test_offline_speculation_figures_are_from_summed_counts() -> None:
    """Over several requests, the acceptance rate is accepted over drafted tokens and
    the mean accepted length 1 + accepted tokens over rounds, all summed: not the mean
    of each request's (1/1 and 0/3 accepted: 25%, not 50%; 1.25 tokens, not 1.5)."""
    from llmopt.bench.offline import spec_totals
    from llmopt.engine.outputs import RequestStats

    one = RequestStats(spec_rounds=1, spec_draft_tokens=1, spec_accepted_tokens=1)
    three = RequestStats(spec_rounds=3, spec_draft_tokens=3, spec_accepted_tokens=0)
    total = spec_totals([one, three])
    assert (total.spec_rounds, total.spec_draft_tokens, total.spec_accepted_tokens) == (4, 4, 1)
    assert total.acceptance_rate == 0.25 and total.mean_accepted_length == 1.25


@pytest.mark.real_model
def test_offline_speculation_counts_every_token_and_request(smollm_fp32, monkeypatch) -> None:
    """With prompt lookup on prompts that repeat a pattern (which the model goes on
    repeating, so drafts are accepted): a batch's decode figure counts tokens, several
    a step, not sequences a step; offline_bench reports the measured requests' counts."""
    from llmopt.bench import offline
    from llmopt.engine.config import EngineConfig
    from llmopt.engine.factory import build_engine

    config = EngineConfig(
        max_context=512, kv_cache_memory=0.05, max_num_seqs=2, prefix_cache=False,
        speculative="ngram", speculative_adaptive=False,
    )  # fmt: skip
    engine = build_engine(smollm_fp32, config)
    pattern = engine.tokenizer.encode(" one two three four five", add_bos=False)
    prompts = [pattern * 4, pattern[1:] * 4]
    t = offline.run_batch(engine, prompts, 8)
    assert [s.completion_tokens for s in t.stats] == [8, 8]
    assert sum(s.spec_accepted_tokens for s in t.stats) > 0  # some steps gave several
    assert t.decoded == 2 * 7  # all but each sequence's first token (in the same step)
    monkeypatch.setattr(offline, "random_ids", lambda engine, n, rng: (pattern * n)[:n])
    result = offline.offline_bench(engine, pp=4, tg=8, batch=2, repeats=1, seed=0)
    assert result.spec.spec_accepted_tokens > 0
    assert result.spec.spec_dict()["spec_acceptance_rate"] > 0


def test_offline_decode_at_depth_over_an_int8_cache(tiny_llama) -> None:
    """--depth: tg and batch decode after contexts of their own; the cache type is the
    bench's --kv-cache-dtype, and an int8 cache holds more tokens than fp32's."""
    args = [str(tiny_llama), "--offline", "--pp", "16", "--tg", "6", "--batch", "3"]
    args += ["--repeats", "1", "--depth", "100", "--dtype", "float32", "--json"]
    fp32, int8 = bench(*args), bench(*args, "--kv-cache-dtype", "int8")
    assert fp32.exit_code == 0 and int8.exit_code == 0, int8.stderr
    a, b = json.loads(fp32.stdout), json.loads(int8.stdout)
    for key in ("tg6_d100_tokens_per_s", "batch3_tg6_d100_tokens_per_s"):
        assert a[key]["mean"] > 0 and b[key]["mean"] > 0
    assert b["kv_cache"].startswith("int8, ")
    assert b["kv_cache_tokens"] > 3 * a["kv_cache_tokens"]


def test_perplexity_matches_transformers_and_scores_each_token_once(tiny_llama) -> None:
    from transformers import AutoModelForCausalLM

    from llmopt.bench.perplexity import perplexity
    from llmopt.corpus import held_out_text
    from llmopt.engine.config import EngineConfig
    from llmopt.engine.factory import load
    from llmopt.models.scoring import Scorer

    _, loaded = load(EngineConfig(model=str(tiny_llama), dtype="float32"))
    ids = loaded.tokenizer.encode(held_out_text())[:300]
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.no_grad():
        loss = ref(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    whole = perplexity(Scorer(loaded.model, 512).logits, ids, window=512, stride=256)  # one window
    assert whole["scored_tokens"] == 299
    assert whole["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    sliding = perplexity(Scorer(loaded.model, 128).logits, ids, window=128, stride=64)
    assert sliding["scored_tokens"] == 299  # every token once, whatever the windows
    assert sliding["perplexity"] == pytest.approx(whole["perplexity"], rel=0.2)
    r = bench(
        str(tiny_llama),
        "--perplexity",
        "--ppl-tokens",
        "100",
        "--window",
        "64",
        "--dtype",
        "float32",
        "--json",
    )
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["scored_tokens"] == 99
    missing = bench(str(tiny_llama), "--perplexity", "--text", "/nonexistent.txt")
    assert missing.exit_code == 2 and "cannot read" in missing.stderr
    dense = bench(str(tiny_llama), "--perplexity", "--decode-arithmetic")
    assert dense.exit_code == 2 and "no quantized linears" in dense.stderr
    on_cpu = bench(str(tiny_llama), "--perplexity", "--ppl-tokens", "50", "--device", "cpu")
    assert on_cpu.exit_code == 0, on_cpu.stderr
    if not torch.cuda.is_available():  # the device is passed on, not ignored
        gpu = bench(str(tiny_llama), "--perplexity", "--device", "cuda")
        assert gpu.exit_code == 2 and "no CUDA device" in gpu.stderr


def test_perplexity_with_decode_arithmetic(tiny_llama, tmp_path) -> None:
    """The quantized linears score through their decode kernel, which already takes
    every row count on the CPU: the same perplexity, and the JSON says which was asked."""
    from llmopt.quant.pipeline import quantize_folder
    from llmopt.quant.spec import QuantSpec

    out = tmp_path / "int4"
    spec = QuantSpec(4, "rtn", 32, sym=False)
    quantize_folder(tiny_llama, out, spec, "llmopt", "", 0, Console(stderr=True))
    # Every row already runs the qgemv kernel: the flag changes nothing there.
    args = [str(out), "--perplexity", "--ppl-tokens", "400", "--window", "300"]
    args += ["--dtype", "float32", "--json"]
    dense, decode = bench(*args), bench(*args, "--decode-arithmetic")
    assert dense.exit_code == 0 and decode.exit_code == 0, decode.stderr
    a, b = json.loads(dense.stdout), json.loads(decode.stdout)
    assert (a["decode_arithmetic"], b["decode_arithmetic"]) == (False, True)
    assert a["perplexity"] == b["perplexity"]


def test_perplexity_against_a_reference(tiny_llama, tmp_path) -> None:
    """--reference scores the same windows with a second model: against itself the KL
    divergence is 0 and the perplexities agree; against the unquantized model an int4
    copy diverges (KL > 0), and the change is the ratio of the two perplexities."""
    from llmopt.quant.pipeline import quantize_folder
    from llmopt.quant.spec import QuantSpec

    out = tmp_path / "int4"
    quantize_folder(tiny_llama, out, QuantSpec(4, "rtn", 32, sym=False), "llmopt", "", 0, Console())
    args = ["--perplexity", "--ppl-tokens", "300", "--window", "128", "--dtype", "float32"]
    same = bench(str(tiny_llama), *args, "--reference", str(tiny_llama), "--json")
    assert same.exit_code == 0, same.stderr
    s = json.loads(same.stdout)
    assert s["kl_divergence"] == pytest.approx(0.0, abs=1e-6)
    assert s["perplexity"] == pytest.approx(s["reference_perplexity"], rel=1e-6)
    quant = bench(str(out), *args, "--reference", str(tiny_llama), "--json")
    assert quant.exit_code == 0, quant.stderr
    q = json.loads(quant.stdout)
    assert q["kl_divergence"] > 1e-4 and "KL divergence" in quant.stderr
    assert q["reference_perplexity"] == pytest.approx(s["perplexity"], rel=1e-6)
    assert q["perplexity_change_pct"] == pytest.approx(
        100 * (q["perplexity"] / q["reference_perplexity"] - 1)
    )
    missing = bench(str(out), *args, "--reference", str(tmp_path / "nothing"))
    assert missing.exit_code != 0 and "Traceback" not in missing.stderr
