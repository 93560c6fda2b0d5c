"""The Llama-family decoder (Llama, Mistral, Qwen2, Qwen3): pre-norm blocks of
grouped-query attention with rotary embeddings (Qwen3: per-head q/k norms before them)
and a SwiGLU MLP. Gemma 3 (models/gemma3.py) is built on it.

The model is bound to a paged KV cache (`bind_cache`, which also chooses its kernels
for it). The forward pass takes a flat batch of new tokens from any number of
sequences and the attention metadata, and returns hidden states; `logits`
projects only the rows the caller samples from (each sequence's last), which saves
the (V, hidden) matmul for every prompt token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from llmopt import heap
from llmopt.config import ModelConfig
from llmopt.errors import ModelFormatError
from llmopt.layers.attention import Attention
from llmopt.layers.attention_metadata import AttentionMetadata
from llmopt.layers.embedding import Embedding, QuantEmbedding
from llmopt.layers.kv_cache import LayerKV, PagedKVCache
from llmopt.layers.linear import Linear, can_prepack, prepack_linears
from llmopt.layers.mlp import SwiGLU
from llmopt.layers.norm import RMSNorm
from llmopt.layers.quant_linear import QuantLinear
from llmopt.layers.rotary import RotaryEmbedding
from llmopt.models.kernel_choice import choose_kernels
from llmopt.models.native_decode import NativeDecoder
from llmopt.weights.lazy import forget
from llmopt.weights.qweight import QuantizedWeight

Weight = torch.Tensor | QuantizedWeight


def attention_for(cfg: ModelConfig, i: int) -> Attention:
    """Layer i's attention as the config describes it."""
    return Attention(
        cfg.hidden_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.attention_bias,
        cfg.layer_window(i),
        qk_norm_eps=cfg.rms_norm_eps if cfg.qk_norm else None,
        scale=cfg.attention_scale,
    )


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = attention_for(cfg, i)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def native_norms(self) -> tuple[RMSNorm | None, ...]:
        """The norms as the native decode step names them: before attention, before the
        MLP (the residual add fused into each), and of attention's and the MLP's outputs
        (None: Llama has neither)."""
        return self.input_layernorm, self.post_attention_layernorm, None, None

    def forward(
        self,
        x: torch.Tensor,  # (N, hidden): the previous block's output
        residual: torch.Tensor | None,  # (N, hidden): the stream before it; None in block 0
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: LayerKV,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this block's MLP output, the residual stream before it). Each residual
        add happens inside the norm that follows it, in place (one fused kernel)."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h = self.input_layernorm(x, residual)
        a = self.self_attn(h, cos, sin, kv, meta)
        h = self.post_attention_layernorm(a, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    layer_class: type[nn.Module] = DecoderLayer

    @staticmethod
    def hf_layer(cfg: ModelConfig, hf: Mapping[str, Weight], i: int) -> dict[str, Weight]:
        """Decoder layer i's tensors under this module's names, from Hugging Face's (the
        quantizer reloads a block from them)."""
        return fuse_hf_layer(cfg, hf, i)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(self.layer_class(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(
            cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings
        )
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.cache: PagedKVCache | None = None  # bound by bind_cache
        # All blocks of a decode-only step in one native call, where kernel_choice finds
        # that it applies (models/native_decode.py).
        self.native_decode: NativeDecoder | None = None

    def bind_cache(self, cache: PagedKVCache) -> None:
        """Run over `cache` from now on, with the kernels chosen for it."""
        self.cache = cache
        choose_kernels(self, cache)

    def forward(
        self,
        input_ids: torch.Tensor,  # (N,) the flat batch of new tokens of all sequences
        positions: torch.Tensor,  # (N,) their positions within their own sequences
        meta: AttentionMetadata,  # where keys go and which each query reads
    ) -> torch.Tensor:
        x = self.embed(input_ids)  # (N, hidden), a new tensor the blocks add into
        return self.norm(*self.blocks(x, positions, meta))

    def blocks(
        self,
        x: torch.Tensor,  # (N, hidden): the embeddings, or a previous block's output
        positions: torch.Tensor,  # (N,)
        meta: AttentionMetadata,
        residual: torch.Tensor | None = None,  # (N, hidden): the stream before that block
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the decoder blocks over x, which they overwrite (and residual); returns
        (the last block's MLP output, the residual stream before it): what a next
        pipeline stage goes on from, as the next block would."""
        cache = self.cache
        assert cache is not None, "bind_cache first"
        rope = self.rope_tables(positions, x.dtype)
        native = self.native_decode
        if native is not None and not meta.prefills and x.shape[0] <= native.max_rows:
            return native(x, rope, meta, residual)
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, *rope[i], cache.layers[i], meta)
        assert residual is not None
        return x, residual

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(N,) token ids -> (N, hidden) inputs of the first block."""
        return self.embed_tokens(input_ids)

    def rope_tables(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's rotary (cos, sin), (N, D) each: one table shared by all."""
        return [self.rotary(positions, dtype)] * len(self.layers)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (N, hidden) -> (N, vocab) in fp32 for sampling."""
        if isinstance(self.lm_head, QuantLinear):
            # Written in fp32 by the kernel: bf16 would round logits of 16-32 to steps
            # of 1/8, enough to flip a near-tie between the top two tokens.
            return self.lm_head(hidden, out_dtype=torch.float32)
        if self.lm_head.takes_rowwise(hidden):
            # The same for a bf16 weight on the CPU, by a kernel whose rows do not depend
            # on the batch: a sequence's logits are the same alone, in a batch of
            # sequences or among its own verification rows.
            return self.lm_head.rowwise(hidden, torch.float32)
        return self.lm_head(hidden).float()


def _cat(parts: list[Weight]) -> Weight:
    if isinstance(parts[0], QuantizedWeight):
        return QuantizedWeight.cat(parts)  # type: ignore[arg-type]
    return torch.cat(parts)  # type: ignore[arg-type]


def fuse_hf_parts(cfg: ModelConfig, hf: Mapping[str, Weight]) -> Iterator[dict[str, Weight]]:
    """Map a Hugging Face Llama state dict onto this module's names, part by part: the
    embedding, norm and head, then each decoder layer in order (no part reads another's
    weights, so a part's may be dropped once it is built).

    q/k/v are concatenated into qkv_proj and gate/up into gate_up_proj, in the order
    the forward pass splits them; quantized weights are concatenated the same way.
    """
    top: dict[str, Weight] = {
        "embed_tokens.weight": hf["model.embed_tokens.weight"],
        "norm.weight": hf["model.norm.weight"],
    }
    if not cfg.tie_word_embeddings:
        top["lm_head.weight"] = hf["lm_head.weight"]
    yield top
    for i in range(cfg.num_layers):
        yield fuse_hf_layer(cfg, hf, i)


def fuse_hf_layer(cfg: ModelConfig, hf: Mapping[str, Weight], i: int) -> dict[str, Weight]:
    """fuse_hf_parts for decoder layer i alone."""
    src, dst = f"model.layers.{i}.", f"layers.{i}."
    attn = src + "self_attn."
    sd: dict[str, Weight] = {}
    sd[dst + "self_attn.qkv_proj.weight"] = _cat([hf[attn + f"{p}_proj.weight"] for p in "qkv"])
    if cfg.attention_bias:
        sd[dst + "self_attn.qkv_proj.bias"] = _cat([hf[attn + f"{p}_proj.bias"] for p in "qkv"])
    sd[dst + "self_attn.o_proj.weight"] = hf[attn + "o_proj.weight"]
    sd[dst + "mlp.gate_up_proj.weight"] = _cat(
        [hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]]
    )
    sd[dst + "mlp.down_proj.weight"] = hf[src + "mlp.down_proj.weight"]
    for norm in ("input_layernorm", "post_attention_layernorm"):
        sd[dst + f"{norm}.weight"] = hf[src + f"{norm}.weight"]
    if cfg.qk_norm:
        for norm in ("q_norm", "k_norm"):
            sd[dst + f"self_attn.{norm}.weight"] = hf[attn + f"{norm}.weight"]
    return sd


def _swap_quantized(
    model: nn.Module, sd: dict[str, Weight], device: torch.device, dtype: torch.dtype
) -> None:
    """Replace each Linear whose weight is quantized by a QuantLinear (taking its bias),
    and a quantized embedding by lookups in its blocks (one QuantLinear with a tied
    head; dequantized where no kernel keeps the blocks)."""
    built: dict[int, QuantLinear] = {}  # by the QuantizedWeight's id: a tied pair's one
    for key in [k for k, v in sd.items() if isinstance(v, QuantizedWeight)]:
        qw: QuantizedWeight = sd.pop(key)  # type: ignore[assignment]
        path = key.removesuffix(".weight")
        parent_path, _, attr = path.rpartition(".")
        layer = built.get(id(qw)) or QuantLinear(
            qw, sd.pop(path + ".bias", None), device, dtype, consume=True
        )
        built[id(qw)] = layer
        if path == "embed_tokens":
            if layer.kernel != "qgemv":  # from the layer: it may have taken qw's codes
                sd[key] = layer.dequantize(torch.float32).clone()
                continue
            layer = QuantEmbedding(layer)  # type: ignore[assignment]
        setattr(model.get_submodule(parent_path) if parent_path else model, attr, layer)


def build_model(
    model_class: type[LlamaForCausalLM],
    parts: Callable[[ModelConfig, Mapping[str, Weight]], Iterator[dict[str, Weight]]],
    cfg: ModelConfig,
    hf: Mapping[str, Weight],
    dtype: torch.dtype,
    device: torch.device,
) -> LlamaForCausalLM:
    """Instantiate `model_class` without random initialisation and take the given
    weights (dense tensors, or QuantizedWeights for linears of a quantized checkpoint),
    mapped onto its names part by part by `parts`. A lazily decoded `hf` (a GGUF
    file's) then holds one part's decoded weights beside the built ones, not the whole
    model's."""
    with torch.device("meta"):
        model = model_class(cfg)
        # A part of a model split over ranks may cut a linear another way than its
        # config says (distributed/shard.py's exact tensor parallelism).
        for path, (out, inp) in getattr(hf, "linear_shapes", {}).items():
            parent, _, attr = path.rpartition(".")
            setattr(model.get_submodule(parent), attr, Linear(inp, out))
    sd: dict[str, torch.Tensor] = {}
    try:
        for part in parts(cfg, hf):
            _swap_quantized(model, part, device, dtype)
            sd.update({k: v.to(device=device, dtype=dtype) for k, v in part.items()})  # type: ignore[union-attr]
            forget(hf)
            # The part's decoded buffers, back to the OS before the next part's: freed
            # into the heap, they leave holes the next (packed, smaller) allocations
            # only partly reuse (SmolLM2 Q4_K_M: 31 MB at the peak).
            heap.trim()
    except KeyError as e:
        raise ModelFormatError(
            f"the checkpoint has no tensor {e} that {cfg.architecture} needs"
        ) from None
    model.load_state_dict(sd, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    for m in model.modules():
        if isinstance(m, RotaryEmbedding):
            m.to(device)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ModelFormatError(f"the checkpoint lacks weights for: {', '.join(missing[:5])}")
    if can_prepack(device, dtype):
        prepack_linears(model)
    return model.eval()


def build_llama(
    cfg: ModelConfig, hf: Mapping[str, Weight], dtype: torch.dtype, device: torch.device
) -> LlamaForCausalLM:
    return build_model(LlamaForCausalLM, fuse_hf_parts, cfg, hf, dtype, device)
