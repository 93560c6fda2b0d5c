"""Validated configuration dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmopt.errors import ModelFormatError, UsageError

GEMMA3 = ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")
QK_NORM = ("Qwen3ForCausalLM", *GEMMA3)  # per-head q/k RMSNorm


@dataclass(frozen=True)
class ModelConfig:
    """The architecture hyper-parameters of a decoder (Llama family, Qwen3, Gemma 3).

    Field names follow the meaning, not any one file format; `from_hf` reads a
    Hugging Face `config.json` dict and the GGUF loader builds the same dict.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    rope_scaling: dict[str, Any] | None = None
    sliding_window: int | None = None
    # Per layer "sliding_attention" or "full_attention" (Gemma 3's local and global
    # layers); empty: every layer alike, windowed if sliding_window is set.
    layer_types: tuple[str, ...] = ()
    local_rope_theta: float | None = None  # the sliding layers' own rotary base (Gemma 3)
    qk_norm: bool = False  # per-head RMSNorm of queries and keys before rotary
    attention_scale: float | None = None  # None: head_dim ** -0.5
    final_logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    quantization: dict[str, Any] | None = None  # config.json's quantization_config

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelFormatError(
                f"num_attention_heads ({self.num_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ModelFormatError(
                f"layer_types lists {len(self.layer_types)} layers for {self.num_layers}"
            )

    def layer_window(self, i: int) -> int | None:
        """The sliding window of layer i; None where it sees the whole sequence."""
        if self.layer_types and self.layer_types[i] != "sliding_attention":
            return None
        return self.sliding_window

    @property
    def widest_window(self) -> int | None:
        """The most keys any layer sees (None: all of them): what the runner lays out."""
        windows = {self.layer_window(i) for i in range(self.num_layers)}
        return None if None in windows else max(windows)  # type: ignore[type-var]

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face config.json dict."""
        archs = cfg.get("architectures") or []
        if not archs:
            raise ModelFormatError("config.json has no 'architectures' entry")
        if "text_config" in cfg:  # Gemma3ForConditionalGeneration: its text decoder
            cfg = {**cfg, **cfg["text_config"], "architectures": archs}
        if cfg.get("attn_logit_softcapping"):
            raise ModelFormatError("attention logit soft-capping (Gemma 2) is not supported")
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
            arch = archs[0]
            gemma = arch in GEMMA3
            rope = _rope_parameters(cfg)
            return cls(
                architecture=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("full_attention", {}).get("rope_theta") or 10000.0),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                # Qwen2 always has q/k/v biases; Llama declares it.
                attention_bias=bool(cfg.get("attention_bias", arch == "Qwen2ForCausalLM")),
                rope_scaling=_rope_scaling(rope.get("full_attention")),
                sliding_window=_sliding_window(cfg),
                layer_types=_layer_types(cfg, gemma),
                local_rope_theta=_local_rope_theta(rope.get("sliding_attention")),
                qk_norm=arch in QK_NORM,
                # Gemma scales scores by query_pre_attn_scalar, not head_dim.
                attention_scale=(
                    float(cfg.get("query_pre_attn_scalar", 256)) ** -0.5 if gemma else None
                ),
                final_logit_softcap=cfg.get("final_logit_softcapping"),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=eos_ids,
                quantization=cfg.get("quantization_config"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFormatError(f"config.json is missing or has a bad field: {e}") from e


def _rope_parameters(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Rotary settings by layer type: "full_attention" (every layer of most models) and,
    for Gemma 3, "sliding_attention". transformers 5 writes `rope_parameters`, flat or
    per layer type; older configs `rope_theta` and `rope_scaling` (Gemma 3:
    `rope_local_base_freq` for the local layers)."""
    params = cfg.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        return params
    full = {**(cfg.get("rope_scaling") or params)}
    full["rope_theta"] = cfg.get("rope_theta") or params.get("rope_theta")
    out = {"full_attention": full}
    if cfg.get("rope_local_base_freq"):
        out["sliding_attention"] = {"rope_theta": cfg["rope_local_base_freq"]}
    return out


def _rope_scaling(params: dict[str, Any] | None) -> dict[str, Any] | None:
    kind = (params or {}).get("rope_type") or (params or {}).get("type") or "default"
    if kind == "default":
        return None
    return {**params, "rope_type": kind}  # type: ignore[dict-item]


def _local_rope_theta(params: dict[str, Any] | None) -> float | None:
    if not params:
        return None
    if _rope_scaling(params) is not None:
        raise ModelFormatError("rope scaling on sliding-window layers is not supported")
    return float(params.get("rope_theta") or 10000.0)


def _layer_types(cfg: dict[str, Any], gemma: bool) -> tuple[str, ...]:
    types = cfg.get("layer_types")
    if types:
        return tuple(types)
    if not gemma:
        return ()
    # Configs written before transformers listed layer types: every `pattern`-th layer
    # global, the others local.
    pattern = int(cfg.get("sliding_window_pattern") or 6)
    layers = int(cfg["num_hidden_layers"])
    return tuple(
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)
    )


def _sliding_window(cfg: dict[str, Any]) -> int | None:
    # Qwen2 configs carry a sliding_window that is only active with use_sliding_window.
    if cfg.get("use_sliding_window") is False:
        return None
    window = cfg.get("sliding_window")
    return int(window) if window else None


@dataclass(frozen=True)
class ServerConfig:
    """What `llmopt serve` is asked to do beyond the engine's own settings and the
    models it serves (server/model_manager.py)."""

    api_key: str | None = None  # None: no auth
    max_queue: int = 256  # requests waiting for a batch slot before 429
    request_timeout_s: float | None = 600.0
    response_cache: bool = True  # the exact cache
    cache_ttl_s: float = 3600.0
    cache_max_entries: int = 1024
    semantic_threshold: float | None = None  # cosine similarity; None: semantic cache off

    def __post_init__(self) -> None:
        checks = [
            (self.max_queue >= 0, "--max-queue must be >= 0"),
            (
                self.request_timeout_s is None or self.request_timeout_s > 0,
                "--request-timeout must be positive",
            ),
            (self.cache_ttl_s > 0, "--cache-ttl must be positive"),
            (self.cache_max_entries >= 1, "--cache-size must be at least 1"),
            (
                self.semantic_threshold is None or 0 < self.semantic_threshold <= 1,
                "--semantic-threshold must be in (0, 1]",
            ),
            (self.api_key is None or len(self.api_key) > 0, "--api-key must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
