"""`llmopt bench MODEL --perplexity`: perplexity on a held-out text (see
llmopt/bench/perplexity.py), through a scoring pass, not an engine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from llmopt.cli.common import emit_json
from llmopt.engine.config import EngineConfig
from llmopt.errors import UsageError


@dataclass(frozen=True)
class PerplexityOptions:
    text: Path | None  # default: the held-out half of pydoc_data.topics
    tokens: int
    window: int
    stride: int | None  # default: half the window
    decode_arithmetic: bool  # quantized linears compute every row as decode does
    reference: str | None  # a model to compare with (KL divergence), the same tokenizer
    as_json: bool
    output: Path | None


def run_perplexity(engine: EngineConfig, o: PerplexityOptions, console: Console) -> None:
    from llmopt.bench.perplexity import evaluate
    from llmopt.corpus import held_out_text, read_text
    from llmopt.engine.factory import load
    from llmopt.layers.quant_linear import use_decode_arithmetic

    if engine.ranks > 1:
        raise UsageError(
            "--perplexity scores the model in one process: drop --tensor-parallel-size "
            "and --pipeline-parallel-size"
        )
    name, loaded = load(engine, console)
    if o.decode_arithmetic and use_decode_arithmetic(loaded.model) == 0:
        raise UsageError(
            "--decode-arithmetic: the model has no quantized linears with a CPU decode kernel"
        )
    text = read_text(o.text, held_out_text, "--text")
    reference, reference_kv, against_what = None, ("auto", "auto"), "the reference"
    if o.reference is None and engine.kv_types != ("auto", "auto"):
        # A KV cache type's cost: the same model over a full-precision cache.
        reference, reference_kv, against_what = loaded.model, ("fp32", "fp32"), "the fp32 KV cache"
    elif o.reference is not None:
        # the reference runs dense: a GGUF or packed checkpoint is dequantized
        ref_name, ref = load(engine.replace(model=o.reference, dequantize=True), console)
        probe = text[:4000]
        if ref.tokenizer.encode(probe) != loaded.tokenizer.encode(probe):
            raise UsageError(f"--reference {ref_name} has another tokenizer than {name}")
        reference = ref.model
    scores = evaluate(
        loaded.model, loaded.tokenizer, text, o.tokens, o.window, o.stride, reference,
        engine.kv_types, reference_kv,
    )  # fmt: skip
    kv = "/".join(engine.kv_types)
    result = {"model": name, "decode_arithmetic": o.decode_arithmetic, "kv_cache_dtype": kv}
    result |= scores
    against = ""
    if reference is not None:
        result["reference"] = o.reference or f"{name}, KV cache fp32/fp32"
        against = (
            f"; {against_what}'s {result['reference_perplexity']:.3f} "
            f"({result['perplexity_change_pct']:+.2f}%), KL divergence from it "
            f"{result['kl_divergence']:.4f} nats/token"
        )
    console.print(
        f"perplexity {result['perplexity']:.3f} over {result['scored_tokens']} tokens "
        f"(window {result['window']}, stride {result['stride']}, {result['seconds']:.0f} s)"
        + against,
        highlight=False,
    )
    emit_json(result, o.as_json, o.output)
