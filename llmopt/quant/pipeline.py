"""`llmopt quantize`: source model -> calibration -> one method per decoder layer ->
a checkpoint in the chosen layout, written to a temporary folder and renamed.

Two steps, as in gpt-fast: the quantized state dict is made offline here; the
loader swaps QuantLinear modules in at load time (models/llama.py).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from llmopt.atomic import atomic_dir
from llmopt.config import ModelConfig
from llmopt.errors import ModelFormatError, UsageError
from llmopt.loader.hf import read_config, read_tensors
from llmopt.models.registry import builder_for
from llmopt.models.scoring import Scorer
from llmopt.quant import awq, awq_gptq, gptq, rtn
from llmopt.quant.calibration import InputStats, calibration_windows, collect
from llmopt.quant.checkpoint import write_checkpoint
from llmopt.quant.gguf_export import export_checkpoint, exportable_config
from llmopt.quant.sequential import quantize_sequential
from llmopt.quant.spec import EMBED_GROUP, QuantSpec, Site, calibrated_modules, llama_sites
from llmopt.weights.qweight import QuantizedWeight, quantize_rtn

METHODS: dict[str, ModuleType] = {"rtn": rtn, "gptq": gptq, "awq": awq, "awq-gptq": awq_gptq}
CALIB_WINDOW = 512  # tokens per calibration sequence
EMBEDDING = "model.embed_tokens.weight"


@dataclass
class QuantizeResult:
    out: Path
    params_quantized: int  # weights of the quantized linears
    bytes_before: int  # those weights in bf16
    bytes_after: int  # packed integers, scales and zero points
    embed_bytes: int  # the token embedding as stored (int8 or dense)
    dense_bytes: int  # everything else (norms, a dense output projection) as stored
    file_bytes: int  # the whole checkpoint on disk
    seconds: float
    calib_tokens: int  # calibration tokens the methods saw (0 for RTN)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def _calibration_scorer(
    folder: Path, cfg: ModelConfig, text: str, tokens: int, console: Console, device: torch.device
) -> tuple[Scorer, list[list[int]]]:
    """The fp32 model bound to a scoring cache of one window, and the calibration text
    in windows."""
    from llmopt.loader.load import load_model

    loaded = load_model(folder, torch.float32, device, console=console)
    window = min(CALIB_WINDOW, cfg.max_position_embeddings)
    ids = loaded.tokenizer.encode(text)
    if len(ids) < tokens:
        console.print(f"the calibration text has {len(ids)} tokens, fewer than the {tokens} "
                      "asked for: calibrating on all of it")  # fmt: skip
    return Scorer(loaded.model, window), calibration_windows(ids, tokens, window)


def calibrate(
    folder: Path,
    cfg: ModelConfig,
    text: str,
    tokens: int,
    console: Console,
    lm_head: bool,
    device: torch.device,
) -> tuple[dict[str, InputStats], int]:
    """Inputs of every linear over the calibration text, from the fp32 model, and the
    number of tokens they came from."""
    scorer, windows = _calibration_scorer(folder, cfg, text, tokens, console, device)
    modules = {n: scorer.model.get_submodule(n) for n in calibrated_modules(cfg, lm_head)}
    with _progress(console) as progress:
        task = progress.add_task("Calibrating", total=len(windows))
        stats = collect(scorer, modules, windows, progress=lambda: progress.advance(task))
    return stats, sum(len(w) for w in windows)


def quantize_tensors(
    cfg: ModelConfig,
    tensors: dict[str, torch.Tensor],
    spec: QuantSpec,
    stats: dict[str, InputStats],
    on_layer: Callable[[], None] = lambda: None,
) -> dict[str, torch.Tensor | QuantizedWeight]:
    """Every decoder linear quantized, from one-pass statistics (AWQ may rescale other
    tensors in place)."""
    method = METHODS[spec.method]
    sites: list[list[Site]] = llama_sites(cfg, stats, spec.lm_head)
    out: dict[str, torch.Tensor | QuantizedWeight] = {}
    for i, layer in enumerate(sites):
        head = i == cfg.num_layers  # the output projection's site comes last
        out.update(method.quantize_layer(layer, tensors, spec.head_spec() if head else spec))
        on_layer()
    return out


def _untie_head(tensors: dict[str, torch.Tensor], spec: QuantSpec) -> None:
    """A tied output projection to be quantized gets its own copy; the embedding stays."""
    if spec.lm_head and "lm_head.weight" not in tensors:
        tensors["lm_head.weight"] = tensors[EMBEDDING].clone()


def quantize_folder(
    folder: Path,
    out: Path,
    spec: QuantSpec,
    fmt: str,
    calib_text: str,
    calib_tokens: int,
    console: Console,
    device: torch.device = torch.device("cpu"),
) -> QuantizeResult:
    """Quantize the Hugging Face folder `folder` into the folder `out` (atomically);
    calibration and the methods' arithmetic run on `device`."""
    t0 = time.perf_counter()
    cfg = read_config(folder)
    builder_for(cfg.architecture)  # refuse unsupported architectures before any work
    if cfg.quantization:
        raise UsageError(f"{folder} is already quantized; quantize the original model")
    raw_cfg = json.loads((folder / "config.json").read_text())
    tensors = {k: v.to(device=device, dtype=torch.float32) for k, v in read_tensors(folder).items()}
    total = cfg.num_layers + int(spec.lm_head)
    _untie_head(tensors, spec)
    weights: dict[str, torch.Tensor | QuantizedWeight]
    calibrated = 0
    if spec.method != "rtn" and spec.sequential:
        scorer, windows = _calibration_scorer(
            folder, cfg, calib_text, calib_tokens, console, device
        )
        calibrated = sum(len(w) for w in windows)
        with _progress(console) as progress:
            task = progress.add_task(f"Quantizing block by block ({spec.label})", total=total)
            weights = quantize_sequential(
                scorer, cfg, tensors, spec, METHODS[spec.method], windows,
                lambda: progress.advance(task),
            )  # fmt: skip
    else:
        if spec.method == "rtn":
            stats = _empty_stats(cfg, spec.lm_head)  # RTN looks at the weights only
        else:
            stats, calibrated = calibrate(
                folder, cfg, calib_text, calib_tokens, console, spec.lm_head, device
            )
        with _progress(console) as progress:
            task = progress.add_task(f"Quantizing ({spec.label})", total=total)
            weights = quantize_tensors(cfg, tensors, spec, stats, lambda: progress.advance(task))
    if spec.embed_bits:
        weights[EMBEDDING] = _quantize_embedding(tensors[EMBEDDING])
    for name, t in tensors.items():  # the tensors not quantized, as AWQ left them
        weights.setdefault(name, t)
    weights = {k: w.to("cpu") for k, w in weights.items()}  # the writers pack on the CPU
    linears = [n for n, w in weights.items() if isinstance(w, QuantizedWeight) and n != EMBEDDING]
    if not linears:
        raise ModelFormatError(f"{folder}: found no linear layer to quantize")
    with atomic_dir(out) as tmp:
        sizes = write_checkpoint(folder, tmp, raw_cfg, weights, spec, fmt)
    params = sum(weights[n].shape[0] * weights[n].shape[1] for n in linears)
    linear_bytes = sum(sizes[n] for n in linears)
    return QuantizeResult(
        out,
        params,
        2 * params,
        linear_bytes,
        sizes[EMBEDDING],
        sum(sizes.values()) - linear_bytes - sizes[EMBEDDING],
        sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
        time.perf_counter() - t0,
        calibrated,
    )


def quantize_to_gguf(
    folder: Path,
    out: Path,
    spec: QuantSpec,
    qtype: str,
    calib_text: str,
    calib_tokens: int,
    console: Console,
    device: torch.device = torch.device("cpu"),
) -> QuantizeResult:
    """GPTQ or AWQ on a GGUF type's grid (spec's, which the caller matched to qtype) into
    a scratch llmopt checkpoint beside `out`, whose codes then go into qtype's blocks as
    they are (gguf_export.export_checkpoint); the result describes the checkpoint."""
    exportable_config(folder)  # before the calibration, not after it
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as scratch:
        checkpoint = Path(scratch) / "checkpoint"
        r = quantize_folder(
            folder, checkpoint, spec, "llmopt", calib_text, calib_tokens, console, device
        )
        export_checkpoint(checkpoint, out, qtype, folder.resolve().name)
    return r


def _quantize_embedding(w: torch.Tensor) -> QuantizedWeight:
    """The token embedding (vocab, hidden) in int8, symmetric, EMBED_GROUP: a lookup
    decodes only its rows, and a tied output projection reads the same codes on the
    int8 kernel (a quarter of fp32's bytes, half of bf16's, every decode step)."""
    return quantize_rtn(w, 8, EMBED_GROUP or w.shape[1], sym=True)


def _empty_stats(cfg: ModelConfig, lm_head: bool) -> dict[str, InputStats]:
    return {name: InputStats() for name in calibrated_modules(cfg, lm_head)}
