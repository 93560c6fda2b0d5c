"""What to quantize to, and the linears that share an input (a "site")."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from llmopt.config import GEMMA3, ModelConfig
from llmopt.errors import UsageError
from llmopt.models.gemma3 import NORM_OFFSET as GEMMA_NORM_OFFSET
from llmopt.quant.calibration import InputStats
from llmopt.weights.fp4 import GROUP as FP4_GROUPS
from llmopt.weights.qweight import QuantizedWeight

METHODS = ("rtn", "gptq", "awq", "awq-gptq")
FOLDING = ("awq", "awq-gptq")  # the methods that fold AWQ's scales into the model
ERROR_FEEDBACK = ("gptq", "awq-gptq")  # the methods that round with GPTQ (act-order)
# int4's defaults: AWQ on float zero points (cli/quantize_options.grid_defaults). On
# SmolLM2, a Q4_1 file, every method finds the file's own grid at group 32; at group 64,
# where none can, AWQ led GPTQ on four held-out texts, three of which no calibration saw
# (BENCHMARKS.md, "Float zero points"), as it had on integer zero points.
DEFAULT_INT4_METHOD = "awq"
# FP4's: AWQ's scales then GPTQ's rounding measured best on SmolLM2 (BENCHMARKS.md, "FP4
# weights"): GPTQ alone +8.3% perplexity, AWQ alone +17.8%, both +6.7%.
FP4_METHOD = "awq-gptq"
DEFAULT_GROUP = 32  # for int4 where it divides every input width (else one scale per row)
# quant/drift.py: the step's fraction by method. AWQ, calibrated on four times GPTQ's
# tokens, bears a longer step (BENCHMARKS.md, "Quantization" has the sweeps).
DEFAULT_DRIFT = {"gptq": 0.25, "awq": 0.5, "awq-gptq": 0.5}
# The damping of the inputs' Hessian by method, as a fraction of its mean diagonal added
# before GPTQ's inverse and drift correction's solve: a prior that the inputs vary in
# directions the calibration text left quiet. GPTQ's usual 0.01 fits the calibration
# text closely. After AWQ's scales have evened the channels' magnitudes, 0.1 cut the KL
# on all six texts of BENCHMARKS.md ("GPTQ's damping"), most where they differ from the
# calibration text; on raw activations, whose few outlier channels dominate the mean
# diagonal, 0.1 swamps the other channels' statistics (the tiny model with outliers of
# tests/test_quantize.py: GPTQ int4 1.18x the source's perplexity at 0.01, 1.23x at 0.1).
DEFAULT_DAMP = {"rtn": 0.0, "gptq": 0.01, "awq": 0.1, "awq-gptq": 0.1}
# Calibration tokens by method (at most: a shorter text is taken whole). AWQ's scale
# and range searches and its drift fit read the same statistics, with no error feedback
# to make up for noisy ones, so they gain from more tokens; GPTQ alone does not, and the
# tokens cost time linearly. awq-gptq (FP4's default) takes all of pydoc's first half
# (50,011 tokens in CPython 3.11): against 32,768, less KL on five of seven held-out
# texts, the one written after the choice included, for 1.27x the time (BENCHMARKS.md,
# "All of the calibration half").
DEFAULT_CALIB_TOKENS = {"rtn": 0, "gptq": 8192, "awq": 32768, "awq-gptq": 65536}
# The token embedding in int8: symmetric with one scale per row (0), as the int8 kernel
# takes it for a tied output projection. llama.cpp's Q8_0 has one per 32; on SmolLM2
# per row costs no measurable quality (BENCHMARKS.md, "The int8 embedding").
EMBED_GROUP = 0


def default_group_size(cfg: ModelConfig, bits: int) -> int:
    """int8: one scale per row (what torch's int8 kernel takes). int4: 32 where it
    divides the hidden and intermediate widths (llama.cpp's Q4 blocks are 32 wide too),
    else one scale per row."""
    if bits == 8:
        return 0
    g = DEFAULT_GROUP
    return g if cfg.hidden_size % g == 0 and cfg.intermediate_size % g == 0 else 0


@dataclass(frozen=True)
class QuantSpec:
    bits: int  # 8 or 4
    method: str  # rtn | gptq | awq | awq-gptq
    group_size: int  # input channels per scale; 0 = one scale per output row
    sym: bool  # symmetric grid (zero fixed at 2^(bits-1))
    act_order: bool = False  # GPTQ: columns by decreasing activation (see gptq.py)
    # With act_order: groups in input order, grids fixed before GPTQ's loop, no `perm`
    # (GGUF's blocks can hold it). See gptq.py.
    static_groups: bool = False
    # The output projection (untied from the embedding): 0 keeps it dense; 8 is int8
    # with one scale per row (llama.cpp's Q4 files keep it at 8 bits too), 4 the
    # model's own int4 groups. At 135M parameters it is a fifth of the weights.
    head_bits: int = 0
    # GPTQ/AWQ: calibrate each block on the outputs of the blocks before it, already
    # quantized (quant/sequential.py), rather than all blocks in one full-precision pass.
    # None: block by block for both (AWQ's reference goes in one pass, but block by
    # block with drift correction scores better).
    sequential: bool | None = None
    # Block by block: the fraction of the step that refits each linear's target to the
    # full-precision model's outputs (quant/drift.py); 0 is off. None: the method's
    # DEFAULT_DRIFT when block by block, else 0.
    drift: float | None = None
    # The token embedding: 8 stores it as int8 (symmetric, EMBED_GROUP), which a tied
    # output projection then runs on the int8 kernel; 0 keeps it dense (bf16), as the
    # GPTQ and AWQ layouts must. `llmopt quantize` asks 8 for its own layout.
    embed_bits: int = 0
    # GPTQ's and drift correction's damping of the inputs' Hessian, a fraction of its
    # mean diagonal; None: the method's DEFAULT_DAMP.
    damp: float | None = None
    # FP4 (weights/fp4.py): "mxfp4" or "nvfp4", 4-bit e2m1 codes in the format's groups.
    fp4: str | None = None
    # Asymmetric grids: each group's low end at its minimum (fp16), the zero point a
    # fraction, as GGUF's Q4_1 holds it (weights/qweight.grid), rather than an integer.
    float_zero: bool = False
    # Linears (Hugging Face weight names) rounded to int8 (symmetric, one scale per row)
    # rather than the spec's 4-bit grid: a mixed model in the manner of llama.cpp's
    # Q4_K_M, which gives some layers' ffn_down more bits (int8_down_proj below).
    int8_linears: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise UsageError("choose --int8 or --int4")
        if self.fp4 is not None:
            self._check_fp4()
        if self.method not in METHODS:
            raise UsageError(f"unknown method '{self.method}'; choose one of {', '.join(METHODS)}")
        if self.group_size < 0:
            raise UsageError("--group-size must be positive (0: one scale per row)")
        if self.head_bits not in (0, 4, 8) or 0 < self.head_bits < self.bits:
            raise UsageError("--lm-head-bits must be 8, or 4 with --int4")
        if self.float_zero and (self.sym or self.fp4):
            grid = "FP4's codes have" if self.fp4 else "a symmetric grid has"
            raise UsageError(f"{grid} no zero point to make float: drop --float-zero")
        if self.int8_linears and self.bits != 4:
            raise UsageError("int8 linears go with a 4-bit model (--int4 or --fp4)")
        if self.embed_bits not in (0, 8):
            raise UsageError("the embedding is stored in int8 or kept dense")
        if self.sequential is None:
            object.__setattr__(self, "sequential", self.method != "rtn")
        block_by_block = self.sequential and self.method != "rtn"
        if self.drift is None:
            drift = DEFAULT_DRIFT[self.method] if block_by_block else 0.0
            object.__setattr__(self, "drift", drift)
        if not 0 <= self.drift <= 1:
            raise UsageError("--drift-correction must be between 0 and 1")
        if self.drift and not block_by_block:
            raise UsageError("--drift-correction needs GPTQ or AWQ block by block (--sequential)")
        if self.damp is None:
            object.__setattr__(self, "damp", DEFAULT_DAMP[self.method])
        elif self.method == "rtn" and self.damp:  # (a replace() of RTN's carries its 0)
            raise UsageError("--damp needs a calibrated method (GPTQ, AWQ or awq-gptq)")
        elif self.method != "rtn" and not 0 < self.damp <= 10:
            raise UsageError("--damp must be above 0 and at most 10")

    def _check_fp4(self) -> None:
        if self.fp4 not in FP4_GROUPS:
            raise UsageError(f"unknown --fp4 '{self.fp4}'; choose one of {', '.join(FP4_GROUPS)}")
        if self.bits != 4 or self.group_size != FP4_GROUPS[self.fp4]:
            raise UsageError(
                f"{self.fp4.upper()} has groups of {FP4_GROUPS[self.fp4]}: drop --group-size"
            )

    @property
    def lm_head(self) -> bool:
        return self.head_bits > 0

    def head_spec(self) -> QuantSpec:
        """The output projection's spec: the model's, or int8 per row (sym, as --int8)."""
        if self.head_bits in (0, self.bits):
            return self
        return self.int8_spec()

    def int8_spec(self) -> QuantSpec:
        """int8, symmetric, one scale per row, for the output projection and the
        int8_linears. One group per row needs no input order (static: no `perm`)."""
        return replace(
            self, bits=8, group_size=0, sym=True, fp4=None, float_zero=False,
            static_groups=self.act_order, int8_linears=(),
        )  # fmt: skip

    def site_spec(self, site: Site) -> QuantSpec:
        """The spec a site's linears are rounded with: int8 where they are int8_linears
        (all of them: a site's linears share one grid search and one Hessian)."""
        wide = [n in self.int8_linears for n in site.names]
        if not any(wide):
            return self
        if not all(wide):
            raise UsageError(f"int8 and 4-bit linears in one site: {', '.join(site.names)}")
        return self.int8_spec()

    def group_for(self, in_features: int) -> int:
        g = self.group_size or in_features
        if in_features % g:
            raise UsageError(
                f"--group-size {g} does not divide a layer's input width ({in_features}); "
                "choose a divisor such as 32, 64 or 128"
            )
        return g

    @property
    def label(self) -> str:
        group = f"g{self.group_size}" if self.group_size else "per-channel"
        sym = "-sym" if self.sym and self.bits == 4 else "-fz" if self.float_zero else ""
        head = {0: "", self.bits: "-head"}.get(self.head_bits, f"-head{self.head_bits}")
        embed = "" if self.embed_bits else "-embed16"
        down = "-down8" if self.int8_linears else ""
        if self.fp4:
            return f"{self.fp4}-{self.method}{head}{down}{embed}"
        return f"int{self.bits}-{self.method}-{group}{sym}{head}{down}{embed}"


@dataclass
class Site:
    """Linears that read the same input (q/k/v; gate/up; o; down) and that input.

    owner: the tensor whose output channels are this input's channels, so that AWQ can
    fold a per-channel scale into it (a norm's weight, or the rows of up_proj or v_proj,
    with the bias of those rows where there is one: owner_bias).
    """

    names: list[str]  # Hugging Face weight names, e.g. model.layers.0.self_attn.q_proj.weight
    stats: InputStats
    owner: str | None
    no_clip: int = 0  # leading fused rows AWQ must not clip (q and k: attention logits)
    # o_proj under grouped-query attention: each of the owner's (v_proj's) channels
    # feeds `share` query heads of `head_dim` channels, so a scale folded into v must
    # be the same on all of them (input channel (kv, h, d) reads v channel (kv, d)).
    share: int = 1
    head_dim: int = 0
    # A norm owner stored as an offset from this (Gemma's multiply by 1 + w): a fold
    # divides offset + w.
    owner_offset: float = 0.0

    def tie(self, v: torch.Tensor) -> torch.Tensor:
        """A per-input-channel vector (in,) averaged over the channels that read one
        owner channel, and spread back (in,); v itself without grouped heads."""
        if self.share == 1:
            return v
        heads = v.view(-1, self.share, self.head_dim)  # (kv, share, head_dim)
        return heads.mean(1, keepdim=True).expand_as(heads).reshape(-1)

    @property
    def owner_bias(self) -> str | None:
        """The name the owner's bias has if it has one (v_proj.weight: v_proj.bias, as
        Qwen2's q/k/v biases): it adds into the same channels as the owner's rows."""
        return None if self.owner is None else self.owner.removesuffix(".weight") + ".bias"

    def owner_part(self, s: torch.Tensor) -> torch.Tensor:
        """A tied per-input-channel vector (in,) as the owner's channels see it."""
        if self.share == 1:
            return s
        return s.view(-1, self.share, self.head_dim)[:, 0].reshape(-1)

    def fused(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[n].float() for n in self.names])  # (sum out, in)

    def unfuse(
        self, tensors: dict[str, torch.Tensor], qw: QuantizedWeight
    ) -> dict[str, QuantizedWeight]:
        """A quantized fused matrix back to one per linear, by the linears' row counts."""
        sizes = [tensors[n].shape[0] for n in self.names]
        return dict(zip(self.names, qw.split(sizes), strict=True))


CALIBRATED = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def calibrated_modules(cfg: ModelConfig, lm_head: bool) -> list[str]:
    """Our module names whose inputs calibration records, in llama_sites' terms."""
    names = [f"layers.{i}.{n}" for i in range(cfg.num_layers) for n in CALIBRATED]
    return names + (["lm_head"] if lm_head else [])


def _norm_offset(cfg: ModelConfig) -> float:
    """What the model's norm weights are stored as an offset from (Site.owner_offset)."""
    return GEMMA_NORM_OFFSET if cfg.architecture in GEMMA3 else 0.0


def layer_sites(cfg: ModelConfig, stats: dict[str, InputStats], i: int) -> list[Site]:
    """Decoder layer i's four sites; `stats` is keyed by our fused module names. Gemma 3
    norms the MLP's input with pre_feedforward_layernorm (its post_attention_layernorm
    norms attention's output, before the residual add: no linear reads it)."""
    hf, ours = f"model.layers.{i}.", f"layers.{i}."
    attn, mlp = hf + "self_attn.", hf + "mlp."
    q_k_rows = (cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim
    # o_proj's input channels are v_proj's output channels, each repeated for the
    # query heads that share a kv head (Site.share).
    share = cfg.num_heads // cfg.num_kv_heads
    offset = _norm_offset(cfg)
    gemma = cfg.architecture in GEMMA3
    mlp_norm = "pre_feedforward_layernorm" if gemma else "post_attention_layernorm"
    return [
        Site(
            [attn + f"{p}_proj.weight" for p in "qkv"],
            stats[ours + "self_attn.qkv_proj"],
            hf + "input_layernorm.weight",
            no_clip=q_k_rows,
            owner_offset=offset,
        ),
        Site(
            [attn + "o_proj.weight"],
            stats[ours + "self_attn.o_proj"],
            attn + "v_proj.weight",
            share=share,
            head_dim=cfg.head_dim,
        ),
        Site(
            [mlp + "gate_proj.weight", mlp + "up_proj.weight"],
            stats[ours + "mlp.gate_up_proj"],
            hf + f"{mlp_norm}.weight",
            owner_offset=offset,
        ),
        Site([mlp + "down_proj.weight"], stats[ours + "mlp.down_proj"], mlp + "up_proj.weight"),
    ]


def int8_down_proj(cfg: ModelConfig) -> tuple[str, ...]:
    """down_proj of the layers llama.cpp's Q4_K_M gives more bits (its use_more_bits):
    the first and last eighth, and every third layer between; 14 of SmolLM2's 30. In
    int8 beside MXFP4 (a tenth more bytes, still under int4's) they cut the KL most for
    their bytes, more than every down_proj or every o_proj (BENCHMARKS.md, "int8
    down_proj beside MXFP4")."""
    n = cfg.num_layers
    wide = [i for i in range(n) if i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2]
    return tuple(f"model.layers.{i}.mlp.down_proj.weight" for i in wide)


def head_site(cfg: ModelConfig, stats: InputStats) -> Site:
    """The output projection, whose input is the final norm's output."""
    return Site(["lm_head.weight"], stats, "model.norm.weight", owner_offset=_norm_offset(cfg))


def llama_sites(cfg: ModelConfig, stats: dict[str, InputStats], lm_head: bool) -> list[list[Site]]:
    """Per decoder layer, its four sites, and the output projection's own site last
    when it is quantized too; `stats` is keyed by our fused module names."""
    layers = [layer_sites(cfg, stats, i) for i in range(cfg.num_layers)]
    return layers + ([[head_site(cfg, stats["lm_head"])]] if lm_head else [])
