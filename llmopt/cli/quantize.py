"""`llmopt quantize MODEL (--int8 | --int4 | --fp4)`: quantize, write, report, register.

Progress and the report go to stderr; `--json` prints the report as one JSON object
on stdout for scripts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import typer
from rich.console import Console

from llmopt.cli.engine_options import engine_options
from llmopt.cli.quantize_options import (
    calibrated_gguf_grid,
    check_format,
    check_fp4_flags,
    choose_gguf_type,
    default_method,
    describe_defaults,
    fp4_int8_down,
    grid_defaults,
)
from llmopt.corpus import calibration_text, read_text
from llmopt.engine.config import EngineConfig
from llmopt.errors import UsageError
from llmopt.quant.spec import (
    DEFAULT_CALIB_TOKENS,
    FP4_GROUPS,
    FP4_METHOD,
    QuantSpec,
    default_group_size,
    int8_down_proj,
)


def _perplexity(path: Path, tokens: int, console: Console) -> float:
    from llmopt.bench.perplexity import evaluate
    from llmopt.corpus import held_out_text
    from llmopt.engine.factory import load
    from llmopt.layers.quant_linear import use_exact_arithmetic

    _, loaded = load(EngineConfig(model=str(path), dtype="float32"), console)
    # The weights' cost alone, the same on every CPU: dequantized and multiplied in fp32,
    # not the runtime's int8 activations or (on AMX) bf16 GEMMs, whose rounding depends on
    # the CPU and would move the score with the machine.
    use_exact_arithmetic(loaded.model)
    with console.status(f"Perplexity of {path.name} on {tokens} held-out tokens"):
        text = held_out_text()
        return evaluate(loaded.model, loaded.tokenizer, text, tokens, 1024, 512)["perplexity"]


@engine_options("device", "threads")
def quantize(
    model: str = typer.Argument(..., help="Registry name, .gguf file or Hugging Face folder."),
    int8: bool = typer.Option(False, "--int8", help="8-bit weights, one scale per row."),
    int4: bool = typer.Option(
        False, "--int4", help="4-bit weights in groups (default AWQ g32; GGUF: in Q4_1 blocks)."
    ),
    fp4: bool = typer.Option(
        False, "--fp4", help="FP4 (e2m1) weights, MXFP4 by default (awq-gptq; GGUF: RTN)."
    ),
    fp4_format: str = typer.Option(
        None, "--fp4-format", help="With --fp4: mxfp4 (a scale per 32) or nvfp4 (per 16)."
    ),
    int8_down: bool = typer.Option(
        None,
        "--int8-down/--fp4-down",
        help="With --fp4: down_proj of the layers llama.cpp's Q4_K_M widens (14 of 30 on "
        "SmolLM2) in int8, at int4 g32's bytes (default for MXFP4 but with --format gguf "
        "--method rtn), or every linear in FP4.",
    ),
    method: str = typer.Option(
        None,
        "--method",
        help="rtn, gptq, awq or awq-gptq (AWQ's scales, GPTQ's rounding); int4: awq (gptq "
        "for --format gptq; rtn: llama.cpp's quantizer for gguf); --fp4: awq-gptq; int8: rtn.",
    ),
    group_size: int = typer.Option(
        None,
        "--group-size",
        help="Input channels per scale (int4: 32, or one per row where 32 does "
        "not divide the model's widths; 0: one per row).",
    ),
    sym: bool = typer.Option(
        None, "--sym/--asym", help="Symmetric grid (default: int8 and --format gptq; else not)."
    ),
    float_zero: bool = typer.Option(
        None,
        "--float-zero/--int-zero",
        help="Asymmetric grids: each group's low end at its minimum in fp16, as GGUF's "
        "Q4_1 (--format llmopt and gguf), or an integer zero point (GPTQ and AWQ layouts).",
    ),
    act_order: bool = typer.Option(
        None,
        "--act-order/--no-act-order",
        help="GPTQ: most active input channels first (default, but for --format awq).",
    ),
    static_groups: bool = typer.Option(
        None,
        "--static-groups/--dynamic-groups",
        help="With --act-order: keep the groups in input order, their grids fixed before "
        "GPTQ runs (no input reordering at run time; the default for GGUF, which needs it).",
    ),
    lm_head: bool = typer.Option(
        False, "--lm-head", help="Quantize the output projection too (faster decode)."
    ),
    lm_head_bits: int = typer.Option(
        8, "--lm-head-bits", help="With --lm-head: 8 (one scale per row) or 4 (the model's)."
    ),
    int8_embedding: bool = typer.Option(
        None,
        "--int8-embedding/--bf16-embedding",
        help="The token embedding, and a tied output projection with it, in int8 with one "
        "scale per row (default for --format llmopt) or kept in bf16.",
    ),
    sequential: bool = typer.Option(
        None,
        "--sequential/--one-pass",
        help="Calibrate each block on the quantized blocks' outputs (default) or all in one pass.",
    ),
    drift: float = typer.Option(
        None,
        "--drift-correction",
        help="Block by block: refit each layer's target to the full-precision outputs by "
        "this fraction (default: GPTQ 0.25, AWQ 0.5; 0 off).",
    ),
    damp: float = typer.Option(
        None,
        "--damp",
        help="GPTQ's and drift correction's damping, a fraction of the Hessian's mean "
        "diagonal (default: GPTQ 0.01, AWQ and awq-gptq 0.1).",
    ),
    calib: Path = typer.Option(None, "--calib", help="Calibration text (default: pydoc topics)."),
    calib_tokens: int = typer.Option(
        None,
        "--calib-tokens",
        help="Calibration tokens at most (default: GPTQ 8192, AWQ 32768, awq-gptq 65536).",
    ),
    fmt: str = typer.Option("llmopt", "--format", help="llmopt, gptq, awq or gguf."),
    gguf_type: str = typer.Option(None, "--gguf-type", help="gguf: Q8_0, Q4_0, Q4_K_M, ..."),
    output: Path = typer.Option(None, "-o", "--output", help="Output folder (.gguf file)."),
    name: str = typer.Option(None, "--name", help="Registry name (default: from the source)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Perplexity before and after."),
    # bench --perplexity's default too; on 2,048 tokens SmolLM2's int4 change moves by
    # a point or more between near-identical checkpoints (BENCHMARKS.md).
    ppl_tokens: int = typer.Option(8192, "--ppl-tokens", help="Held-out tokens to score."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    *,
    engine: EngineConfig,
) -> None:
    """Quantize a model to int8 or int4 (RTN, GPTQ, AWQ; or GGUF), report size and quality."""
    from llmopt.device import resolve_device
    from llmopt.loader.hf import parameter_count, read_config
    from llmopt.loader.load import hf_folder_for
    from llmopt.store.resolve import resolve
    from llmopt.store.store import Store

    console = Console(stderr=True)
    check_fp4_flags(int8, int4, fp4, fp4_format, fmt, gguf_type)
    if int8 == int4 and not fp4:
        raise UsageError("choose one of --int8 or --int4 (or --fp4)")
    if (calib_tokens is not None and calib_tokens < 1) or ppl_tokens < 2:
        raise UsageError("--calib-tokens must be positive and --ppl-tokens at least 2")
    if engine.threads is not None:
        torch.set_num_threads(engine.threads)
    bits = 8 if int8 else 4
    fp4_fmt = (fp4_format or "mxfp4").lower() if fp4 else None
    store = Store()
    src_name, src_path = resolve(model, store, console)
    folder = hf_folder_for(src_path, store, console, dense=True)
    cfg = read_config(folder)
    chosen = method is None and group_size is None and not fp4  # int4: say the defaults
    if fp4:
        method = method or (FP4_METHOD if fmt != "gguf" else "rtn")
    method = method or default_method(bits, fmt, gguf_type)
    if fmt == "gguf":
        gguf_type = choose_gguf_type(gguf_type, bits, fp4_fmt, method, console)
    elif gguf_type:
        raise UsageError("--gguf-type goes with --format gguf")
    calibrated_gguf = fmt == "gguf" and method != "rtn"
    int8_down = fp4_int8_down(int8_down, fp4_fmt, fmt == "gguf" and not calibrated_gguf)
    if fp4_fmt and group_size is None:
        group_size = FP4_GROUPS.get(fp4_fmt, 0)
    if calibrated_gguf:
        group_size, sym, act_order, static_groups = calibrated_gguf_grid(
            gguf_type, group_size, sym, act_order, static_groups
        )
    sym, act_order, static_groups, float_zero = grid_defaults(
        bits, fmt, method, fp4, sym, act_order, static_groups, float_zero
    )
    spec = QuantSpec(
        bits=bits,
        method=method,
        group_size=default_group_size(cfg, bits) if group_size is None else group_size,
        sym=sym,
        act_order=act_order,
        static_groups=static_groups,
        head_bits=lm_head_bits if lm_head else 0,
        sequential=sequential,
        drift=drift,
        damp=damp,
        embed_bits=8 if (fmt == "llmopt" if int8_embedding is None else int8_embedding) else 0,
        fp4=fp4_fmt,
        float_zero=float_zero,
        int8_linears=int8_down_proj(cfg) if int8_down else (),
    )
    check_format(fmt, spec, gguf_type)
    if bits == 4 and chosen and (fmt != "gguf" or calibrated_gguf):
        tied = cfg.tie_word_embeddings and not spec.lm_head
        line = describe_defaults(spec, tied, gguf=fmt == "gguf")
        console.print(f"[dim]{line}[/dim]", highlight=False)
    calib_tokens = calib_tokens or DEFAULT_CALIB_TOKENS[spec.method]
    if fmt == "gguf":  # a calibrated file is named apart from llama.cpp's rounding
        label = gguf_type.lower() + (f"-{spec.method}" if calibrated_gguf else "")
    else:
        label = spec.label + ("" if fmt == "llmopt" else f"-{fmt}")
    base = src_name.removesuffix(".gguf").removesuffix("-hf")  # "qwen2.5-0.5b-..." keeps dots
    name = name or f"{base}-{label}"
    out = (output or store.model_dir(name) / (f"{name}.gguf" if fmt == "gguf" else "")).expanduser()
    if out.exists() and not force:
        raise UsageError(f"{out} exists; pass --force to replace it")
    calib_text = read_text(calib, calibration_text, "--calib") if spec.method != "rtn" else ""
    report: dict[str, Any] = {"source": src_name, "output": str(out), "name": name, "format": fmt}
    report["model_bytes_bf16"] = 2 * parameter_count(folder)  # the whole model, every tensor
    if calibrated_gguf:
        dev = resolve_device(engine.device)
        report |= _quantize_gguf_calibrated(
            folder, out, spec, gguf_type, calib_text, calib_tokens, console, dev
        )
    elif fmt == "gguf":
        report |= _quantize_gguf(folder, out, gguf_type, engine.threads)
    else:
        dev = resolve_device(engine.device)
        report |= _quantize_checkpoint(
            folder, out, spec, fmt, calib_text, calib_tokens, console, dev
        )
    report["file_ratio"] = report["file_bytes"] / report["model_bytes_bf16"]
    if evaluate:
        before = _perplexity(folder, ppl_tokens, console)
        after = _perplexity(out, ppl_tokens, console)
        report |= {
            "perplexity_before": before,
            "perplexity_after": after,
            "perplexity_change_pct": 100 * (after / before - 1),
            "ppl_tokens": ppl_tokens,
        }
    _register(store, name, out, fmt, label, src_name)
    _print_report(report, console)
    if as_json:
        print(json.dumps(report))


def _quantize_checkpoint(
    folder: Path,
    out: Path,
    spec: QuantSpec,
    fmt: str,
    text: str,
    tokens: int,
    console: Console,
    device: torch.device,
) -> dict[str, Any]:
    from llmopt.quant.pipeline import quantize_folder

    r = quantize_folder(folder, out, spec, fmt, text, tokens, console, device)
    return {
        "method": spec.method,
        "bits": spec.bits,
        "group_size": spec.group_size,
        "sym": spec.sym,
        "params_quantized": r.params_quantized,
        "linear_bytes_bf16": r.bytes_before,
        "linear_bytes": r.bytes_after,
        "linear_ratio": r.bytes_after / r.bytes_before,
        "bytes_per_param": r.bytes_after / r.params_quantized,
        "int8_linears": len(spec.int8_linears),  # beside the 4-bit ones (--int8-down)
        "embed_bytes": r.embed_bytes,
        "embed_bits": spec.embed_bits or 16,
        "other_bytes": r.dense_bytes,
        "file_bytes": r.file_bytes,
        "seconds": r.seconds,
        "calib_tokens": r.calib_tokens,
    }


def _quantize_gguf_calibrated(
    folder: Path,
    out: Path,
    spec: QuantSpec,
    qtype: str,
    text: str,
    tokens: int,
    console: Console,
    device: torch.device,
) -> dict[str, Any]:
    from llmopt.quant.pipeline import quantize_to_gguf

    r = quantize_to_gguf(folder, out, spec, qtype, text, tokens, console, device)
    return {
        "gguf_type": qtype,
        "method": spec.method,
        "sym": spec.sym,
        "calib_tokens": r.calib_tokens,
        "seconds": r.seconds,
        "file_bytes": out.stat().st_size,
    }


def _quantize_gguf(folder: Path, out: Path, qtype: str, threads: int | None) -> dict[str, Any]:
    from llmopt.quant.gguf_export import export_gguf

    export_gguf(folder, out, qtype, threads)
    return {"gguf_type": qtype, "file_bytes": out.stat().st_size}


def _register(store: Any, name: str, out: Path, fmt: str, label: str, source: str) -> None:
    from llmopt.store.local_registry import register

    entry = {
        "description": f"{source} quantized by llmopt ({label})",
        "format": "gguf" if fmt == "gguf" else "hf",
        "quantization": label,
        "file": out.name if fmt == "gguf" else None,
        "sources": [{"local": str(out.resolve())}],
    }
    register(store.home, name, entry)


def _print_report(r: dict[str, Any], console: Console) -> None:
    mb = 1e6
    lines = [
        f"wrote {r['output']} ({r['file_bytes'] / mb:.1f} MB, {r['file_ratio']:.3f}x the "
        f"whole model's {r['model_bytes_bf16'] / mb:.1f} MB in bf16), registered as {r['name']}"
    ]
    if "linear_bytes" in r:
        lines.append(
            f"linear weights: {r['linear_bytes_bf16'] / mb:.1f} MB in bf16 -> "
            f"{r['linear_bytes'] / mb:.1f} MB ({r['linear_ratio']:.3f}x, "
            f"{r['bytes_per_param']:.3f} bytes/param"
            + (f", {r['int8_linears']} linears in int8" if r.get("int8_linears") else "")
            + "); embedding "
            f"{r['embed_bytes'] / mb:.1f} MB ({'int8' if r['embed_bits'] == 8 else 'dense'}); "
            f"the rest (norms, a dense output projection) {r['other_bytes'] / mb:.1f} MB"
        )
    if "perplexity_after" in r:
        lines.append(
            f"perplexity {r['perplexity_before']:.3f} -> {r['perplexity_after']:.3f} "
            f"({r['perplexity_change_pct']:+.2f}%) on {r['ppl_tokens']} held-out tokens"
        )
    for line in lines:
        console.print(line, highlight=False)
