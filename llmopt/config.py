"""Validated configuration dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmopt.errors import ModelFormatError, UsageError


@dataclass(frozen=True)
class ModelConfig:
    """The architecture hyper-parameters of a Llama-family decoder.

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
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    quantization: dict[str, Any] | None = None  # config.json's quantization_config

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelFormatError(
                f"num_attention_heads ({self.num_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face config.json dict."""
        archs = cfg.get("architectures") or []
        if not archs:
            raise ModelFormatError("config.json has no 'architectures' entry")
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
            arch = archs[0]
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
                rope_theta=float(_rope_theta(cfg)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                # Qwen2 always has q/k/v biases; Llama declares it.
                attention_bias=bool(cfg.get("attention_bias", arch == "Qwen2ForCausalLM")),
                rope_scaling=_rope_scaling(cfg),
                sliding_window=_sliding_window(cfg),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=eos_ids,
                quantization=cfg.get("quantization_config"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFormatError(f"config.json is missing or has a bad field: {e}") from e


def _rope_theta(cfg: dict[str, Any]) -> float:
    # transformers 5 moved rope_theta into rope_parameters.
    params = cfg.get("rope_parameters") or {}
    return cfg.get("rope_theta") or params.get("rope_theta") or 10000.0


def _rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not scaling:
        return None
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return None
    return {**scaling, "rope_type": kind}


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
