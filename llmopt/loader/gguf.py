"""GGUF files: metadata to a Hugging Face config, tensors to HF names (in fp32, or the
linears kept in their quantized blocks), and a conversion to a Hugging Face folder so
that later loads skip dequantization and the tokenizer build."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmopt.atomic import atomic_dir, atomic_file
from llmopt.config import ModelConfig
from llmopt.errors import ModelFormatError
from llmopt.loader.converted_format import FORMAT, FORMAT_FILE
from llmopt.loader.gguf_tokenizer import bpe_vocabulary, build_tokenizer, spm_vocabulary
from llmopt.loader.gguf_weights import INDEX, Weight, hf_weights, records_of, write_index
from llmopt.models.registry import hf_architecture_for_gguf
from llmopt.vocab.spm_file import filename_of, write_spm


class GGUFFile:
    """Metadata and tensors of one GGUF file."""

    def __init__(self, path: Path) -> None:
        from gguf import GGUFReader

        self.path = path
        try:
            self.reader = GGUFReader(str(path))
            self.meta: dict[str, Any] = {k: f.contents() for k, f in self.reader.fields.items()}
        except Exception as e:  # the reader raises many kinds on a damaged file
            raise ModelFormatError(
                f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); "
                "delete it and pull it again"
            ) from e
        self.arch = str(self.meta.get("general.architecture", ""))

    def _get(self, key: str, default: Any = None) -> Any:
        return self.meta.get(f"{self.arch}.{key}", default)

    def hf_config(self) -> dict[str, Any]:
        """A Hugging Face config.json dict for this file's architecture."""
        architecture = hf_architecture_for_gguf(self.arch)
        heads = int(self._get("attention.head_count"))
        hidden = int(self._get("embedding_length"))
        names = {t.name for t in self.reader.tensors}
        if "rope_freqs.weight" in names:
            raise ModelFormatError(
                f"{self.path.name} uses per-frequency rope factors (Llama 3.1 style), "
                "which llmopt does not read from GGUF yet; use the Hugging Face folder"
            )
        eps = float(self._get("attention.layer_norm_rms_epsilon", 1e-6))
        cfg: dict[str, Any] = {
            "architectures": [architecture],
            "model_type": architecture.removesuffix("ForCausalLM").lower(),
            "vocab_size": len(self.meta["tokenizer.ggml.tokens"]),
            "hidden_size": hidden,
            "intermediate_size": int(self._get("feed_forward_length")),
            "num_hidden_layers": int(self._get("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self._get("attention.head_count_kv", heads)),
            "head_dim": int(self._get("attention.key_length", hidden // heads)),
            # The file keeps eps as float32 (1e-5 -> 9.99999974e-06); print it back short.
            "rms_norm_eps": float(f"{eps:.7g}"),
            "rope_theta": float(self._get("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self._get("context_length", 4096)),
            "tie_word_embeddings": "output.weight" not in names,
            "attention_bias": "blk.0.attn_q.bias" in names,
            "bos_token_id": self.meta.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.meta.get("tokenizer.ggml.eos_token_id"),
            "torch_dtype": "float32",
        }
        scaling = self._get("rope.scaling.type")
        if scaling and scaling != "none":
            cfg["rope_scaling"] = {
                "rope_type": scaling,
                "factor": float(self._get("rope.scaling.factor", 1.0)),
                "original_max_position_embeddings": int(
                    self._get(
                        "rope.scaling.original_context_length", cfg["max_position_embeddings"]
                    )
                ),
            }
        window = self._get("attention.sliding_window")
        if window:
            cfg["sliding_window"] = int(window)
        if self.arch == "gemma3":
            cfg.update(self._gemma3_fields(cfg))
        return cfg

    def _gemma3_fields(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """What a Gemma 3 text config adds, with transformers' defaults (and llama.cpp's
        rules) where the file says nothing."""
        layers = cfg["num_hidden_layers"]
        # llama.cpp writes the pattern as one flag per layer (true: sliding), or not at
        # all: then every sixth layer is global.
        pattern = self._get("attention.sliding_window_pattern", 6)
        sliding = (
            [bool(p) for p in pattern]
            if isinstance(pattern, list)
            else [(i + 1) % int(pattern) != 0 for i in range(layers)]
        )
        full = {"rope_type": "default", "rope_theta": cfg.pop("rope_theta")}
        full.update(cfg.pop("rope_scaling", {}))
        local = float(self._get("rope.freq_base_swa", 10000.0))
        # Not in the file either: llama.cpp scales the 27B model (62 blocks) by
        # hidden / heads, every other size by head_dim.
        heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
        scalar = hidden // heads if layers == 62 else cfg["head_dim"]
        return {
            "model_type": "gemma3_text",
            "hidden_activation": "gelu_pytorch_tanh",
            "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
            "rope_parameters": {
                "full_attention": full,
                "sliding_attention": {"rope_type": "default", "rope_theta": local},
            },
            "query_pre_attn_scalar": scalar,
            "final_logit_softcapping": self._get("final_logit_softcapping"),
        }

    def hf_tensors(self, keep_quantized: bool = False) -> Mapping[str, Weight]:
        """All weights under Hugging Face names (see gguf_weights.hf_weights)."""
        cfg = ModelConfig.from_hf(self.hf_config())
        return hf_weights(records_of(self.reader), cfg, self.arch, self.path.name, keep_quantized)

    def tokenizer_config(self) -> dict[str, Any]:
        tokens = self.meta["tokenizer.ggml.tokens"]

        def tok(key: str) -> str | None:
            i = self.meta.get(f"tokenizer.ggml.{key}_token_id")
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        return {
            "bos_token": tok("bos"),
            "eos_token": tok("eos"),
            "unk_token": tok("unknown"),
            "pad_token": tok("padding"),
            "add_bos_token": bool(self.meta.get("tokenizer.ggml.add_bos_token", False)),
            "chat_template": self.meta.get("tokenizer.chat_template"),
        }

    def convert(self, out_dir: Path) -> None:
        """Write a Hugging Face folder without weights (config, tokenizer) atomically,
        with the index of the file's tensors, through which loads read them."""
        with atomic_dir(out_dir) as tmp:
            (tmp / "config.json").write_text(json.dumps(self.hf_config(), indent=2))
            build_tokenizer(self.meta, self.path, tmp).save(str(tmp / "tokenizer.json"))
            (tmp / "tokenizer_config.json").write_text(
                json.dumps(self.tokenizer_config(), indent=2)
            )
            write_index(self.reader, self.arch, tmp / INDEX)
            self.upgrade(tmp)

    def upgrade(self, folder: Path) -> None:
        """Add what a converted folder of an older format lacks, then mark it current."""
        vocab = spm_vocabulary(self.meta) or bpe_vocabulary(self.meta)
        if vocab is not None:
            write_spm(vocab, folder / filename_of(vocab))
        with atomic_file(folder / FORMAT_FILE) as tmp:
            tmp.write_text(json.dumps({"format": FORMAT}))

    def write_dense(self, folder: Path) -> None:
        """Add fp32 safetensors of every weight to a converted folder (what quantizing
        and exporting read), under a temporary name renamed when complete."""
        from safetensors.torch import save_file

        with atomic_file(folder / "model.safetensors") as tmp:
            save_file(dict(self.hf_tensors()), str(tmp), {"format": "pt"})
