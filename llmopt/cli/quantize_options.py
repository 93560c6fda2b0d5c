"""What `llmopt quantize`'s flags mean: the defaults they leave to llmopt (method, GGUF
type, a calibrated GGUF's grid), said in one line where chosen, and the combinations
refused, each with a one-line error that names the fix."""

from __future__ import annotations

from rich.console import Console

from llmopt.errors import UsageError
from llmopt.quant.spec import DEFAULT_INT4_METHOD, QuantSpec

FORMATS = ("llmopt", "gptq", "awq", "gguf")


# Why each width's default GGUF type, printed when --gguf-type is not given.
GGUF_DEFAULT_WHY = {
    "Q8_0": "GGUF type Q8_0: llama.cpp's 8-bit blocks of 32, one scale each",
    "Q4_K_M": "GGUF type Q4_K_M: llama.cpp's 4-bit K-quant mix (some tensors at 6 bits, and "
    "Q5_0 where a row is no multiple of 256), from llama.cpp's own quantizer; "
    "--gguf-type picks another (Q4_0, Q4_1, Q5_K_M, ...)",
    "Q4_1": "GGUF type Q4_1: llama.cpp's 4-bit blocks of 32 with a scale and a minimum, "
    "which llmopt and llama.cpp both run packed (Q4_K_M needs llama.cpp's quantizer: "
    "pip install llama-cpp-python)",
}


def default_gguf_type(bits: int) -> str:
    """int8: Q8_0; int4: Q4_K_M where llama.cpp's quantizer is here, else Q4_1."""
    from llmopt.quant.gguf_export import has_llama_quantizer

    if bits == 8:
        return "Q8_0"
    return "Q4_K_M" if has_llama_quantizer() else "Q4_1"


def default_method(bits: int, fmt: str) -> str:
    """int4: AWQ (spec.DEFAULT_INT4_METHOD), or GPTQ for --format gptq; int8, and GGUF
    (llama.cpp's own blocks, rounded to nearest), RTN."""
    if bits == 8 or fmt == "gguf":
        return "rtn"
    return "gptq" if fmt == "gptq" else DEFAULT_INT4_METHOD


def describe_defaults(spec: QuantSpec, tied: bool) -> str:
    """One line: the int4 configuration the defaults chose, and why."""
    group = f"group {spec.group_size}" if spec.group_size else "one scale per row"
    embed = "embedding" + (" and tied output projection" if tied else "")
    embed += " in int8 (one scale per row)" if spec.embed_bits else " kept dense"
    head = "" if tied and spec.embed_bits else ", output projection kept dense"
    return (
        f"int4 defaults: {spec.method.upper()}, {group}, "
        f"{'symmetric' if spec.sym else 'asymmetric'}, drift correction {spec.drift:g}, "
        f"{embed}{head}: the configuration that measured best on held-out texts of four "
        'kinds (BENCHMARKS.md, "The int4 defaults, judged on unseen text")'
    )


def check_fp4_flags(
    int8: bool, int4: bool, fp4: bool, fp4_format: str | None, fmt: str, gguf_type: str | None
) -> None:
    if fp4 and (int8 or int4):
        raise UsageError("--fp4 is a weight type of its own: drop --int8 and --int4")
    if fp4_format and not fp4:
        raise UsageError("--fp4-format goes with --fp4")
    if fp4 and fmt in ("gptq", "awq"):
        raise UsageError(f"--format {fmt} holds integer weights: use --format llmopt or gguf")
    if fp4 and gguf_type:
        raise UsageError(
            "--fp4 picks the GGUF type itself (MXFP4, or NVFP4 with --fp4-format nvfp4): "
            "drop --gguf-type"
        )


def choose_gguf_type(
    given: str | None, bits: int, fp4_fmt: str | None, method: str, console: Console
) -> str:
    """The GGUF type to write: the one asked for, the FP4 format's for --fp4, Q4_1 for a calibrated
    int4 file (GPTQ or AWQ: Q4_K's grid is not theirs), else default_gguf_type, said."""
    if given:
        return given.upper()
    if fp4_fmt:
        return fp4_fmt.upper()
    if method != "rtn" and bits == 4:
        why = (
            f"GGUF type Q4_1: {method.upper()} on the grid of Q4_1's blocks (32 weights, a "
            "scale and a minimum), written as they are; --gguf-type Q4_0 for its symmetric one"
        )
        console.print(f"[dim]{why}[/dim]")
        return "Q4_1"
    chosen = default_gguf_type(bits)
    console.print(f"[dim]{GGUF_DEFAULT_WHY[chosen]}[/dim]")
    return chosen


def check_format(fmt: str, spec: QuantSpec, gguf_type: str | None = None) -> None:
    if fmt not in FORMATS:
        raise UsageError(f"unknown --format '{fmt}'; choose one of {', '.join(FORMATS)}")
    if fmt == "awq" and (spec.bits != 4 or spec.sym):
        raise UsageError("--format awq holds 4-bit weights with zero points: use --int4")
    if fmt == "gptq" and spec.head_bits not in (0, spec.bits):
        raise UsageError(
            f"--format gptq holds one bit width: add --lm-head-bits {spec.bits} or drop --lm-head"
        )
    if fmt == "awq" and (spec.lm_head or spec.act_order):
        raise UsageError(
            "--format awq holds neither act-order nor a quantized output projection: "
            "drop --act-order and --lm-head"
        )
    if fmt != "llmopt" and spec.embed_bits:
        raise UsageError("--int8-embedding goes with --format llmopt: drop it")
    if fmt == "gguf" and spec.method != "rtn":
        _check_calibrated_gguf(spec, str(gguf_type))


def calibrated_gguf_grid(
    gguf_type: str,
    group_size: int | None,
    sym: bool | None,
    act_order: bool | None,
    static_groups: bool | None,
) -> tuple[int, bool, bool, bool]:
    """GPTQ's or AWQ's grid for a calibrated GGUF, where the flags leave it open: the
    type's blocks (Q4_0 symmetric), with act-order in static groups (the codes in the
    file's input order; on SmolLM2's Q4_0, GPL-3 +19.5% against +23.8% without
    act-order: BENCHMARKS.md, "Static groups"). AWQ ignores act-order."""
    from llmopt.weights.gguf_blocks import ENCODE_GROUP

    return (
        ENCODE_GROUP if group_size is None else group_size,
        gguf_type == "Q4_0" if sym is None else sym,
        True if act_order is None else act_order,
        True if static_groups is None else static_groups,
    )


def _check_calibrated_gguf(spec: QuantSpec, gguf_type: str) -> None:
    """GPTQ and AWQ write GGUF through the blocks whose grid they quantize onto
    (weights/gguf_blocks.ENCODABLE)."""
    from llmopt.weights.gguf_blocks import ENCODABLE, ENCODE_GROUP

    types = [t.name for t in ENCODABLE]
    if gguf_type not in types:
        raise UsageError(
            f"--method {spec.method} writes GGUF as {', '.join(types)} "
            f"(not {gguf_type}): pick one with --gguf-type, or --method rtn"
        )
    if not spec.fp4 and spec.group_size != ENCODE_GROUP:
        raise UsageError(f"{gguf_type} has groups of {ENCODE_GROUP}: drop --group-size")
    if gguf_type == "Q4_0" and not spec.sym:
        raise UsageError("Q4_0's grid is symmetric: drop --asym")
    if (spec.act_order and not spec.static_groups) or spec.lm_head:
        raise UsageError(
            "GGUF holds neither act-order's input order nor a calibrated output "
            "projection: drop --lm-head, and --act-order or add --static-groups"
        )
