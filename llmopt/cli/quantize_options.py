"""What `llmopt quantize`'s flags mean: the defaults they leave to llmopt (method, GGUF
type, a calibrated GGUF's grid), said in one line where chosen, and the combinations
refused, each with a one-line error that names the fix."""

from __future__ import annotations

from rich.console import Console

from llmopt.errors import UsageError
from llmopt.quant.spec import DEFAULT_INT4_METHOD, ERROR_FEEDBACK, QuantSpec

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


def default_method(bits: int, fmt: str, gguf_type: str | None = None) -> str:
    """int4: spec.DEFAULT_INT4_METHOD, in GGUF too (on the grid of Q4_1's blocks) but for
    a --gguf-type only llama.cpp's quantizer writes; int8: RTN."""
    from llmopt.weights.gguf_blocks import ENCODABLE

    if bits == 8:
        return "rtn"
    if fmt == "gguf" and gguf_type and gguf_type.upper() not in [t.name for t in ENCODABLE]:
        return "rtn"
    return "gptq" if fmt == "gptq" else DEFAULT_INT4_METHOD


def grid_defaults(
    bits: int,
    fmt: str,
    method: str,
    fp4: bool,
    sym: bool | None,
    act_order: bool | None,
    static_groups: bool | None,
    float_zero: bool | None,
) -> tuple[bool, bool, bool, bool]:
    """(sym, act_order, static_groups, float_zero) where the flags leave them open.
    Symmetric for int8 and --format gptq (GPTQModel refuses asymmetric GPTQ checkpoints
    it did not write, and vLLM's Marlin kernels need sym). int4 in our layout and GGUF:
    a float zero (Q4_1's grid), and with act-order, static groups, which keep each group
    on its input-order weights: a model that came on such a grid (a Q4_1 file) then
    keeps it, and the codes need no `perm`, which GGUF cannot hold (BENCHMARKS.md,
    "Float zero points"). The AWQ layout holds no act-order."""
    sym = (bits == 8 or fmt == "gptq") if sym is None else sym
    if float_zero is None:
        float_zero = bits == 4 and not fp4 and not sym and fmt in ("llmopt", "gguf")
    if act_order is None:
        act_order = fmt != "awq"
    act_order = act_order and method in ERROR_FEEDBACK
    static = float_zero and act_order if static_groups is None else static_groups
    return sym, act_order, static, float_zero


def describe_defaults(spec: QuantSpec, tied: bool, gguf: bool = False) -> str:
    """One line: the int4 configuration the defaults chose, and why."""
    group = f"group {spec.group_size}" if spec.group_size else "one scale per row"
    grid = "symmetric" if spec.sym else "asymmetric"
    grid += " with float zero points (each group's fp16 minimum)" if spec.float_zero else ""
    order = ""
    if spec.act_order:
        order = ", act-order in static groups" if spec.static_groups else ", act-order"
    embed = "embedding" + (" and tied output projection" if tied else "")
    embed += " in int8 (one scale per row)" if spec.embed_bits else " kept dense"
    head = "" if tied and spec.embed_bits else ", output projection kept dense"
    where = ", in Q4_1's blocks" if gguf else f", {embed}{head}"
    return (
        f"int4 defaults: {spec.method.upper()}, {group}, {grid}{order}, drift correction "
        f"{spec.drift:g}{where}: the configuration that measured best on held-out texts of "
        'four kinds (BENCHMARKS.md, "Float zero points")'
    )


def fp4_int8_down(given: bool | None, fp4_fmt: str | None, plain_gguf: bool) -> bool:
    """Whether some down_proj go to int8 (spec.int8_down_proj): by default with MXFP4,
    whose power-of-two scales lose the most there; never in a GGUF file of llama.cpp's
    own rounding (--method rtn), which rounds every linear to the file's type."""
    if given and not fp4_fmt:
        raise UsageError("--int8-down goes with --fp4")
    if given and plain_gguf:
        raise UsageError("--int8-down needs a calibrated GGUF (--method gptq or awq-gptq)")
    if given is None:
        return fp4_fmt == "mxfp4" and not plain_gguf
    return given


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
            f"GGUF type Q4_1: {method.upper()} on the grid of Q4_1's blocks (32 weights, an "
            "fp16 scale and minimum), written as they are; --gguf-type Q4_0 for its symmetric "
            "one, or --method rtn for llama.cpp's own quantizer (Q4_K_M)"
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
    if fmt in ("gptq", "awq") and spec.float_zero:
        raise UsageError(f"--format {fmt} holds integer zero points: drop --float-zero")
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
    )  # float zero: grid_defaults' (Q4_1's own grid)


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
