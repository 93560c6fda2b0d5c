"""AWQ's folds on whole tiny models: dividing every site's input by its scale, folded
into the site's owner (a norm's weight, v_proj's or up_proj's rows and bias), leaves
the model's function as it was before rounding."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
import torch

from llmopt.loader.hf import read_config
from llmopt.quant import awq
from llmopt.quant.calibration import InputStats
from llmopt.quant.spec import QuantSpec, llama_sites
from tests.conftest import write_tiny_model
from tests.test_gemma3 import tiny_gemma


def _scale_by_input(w: torch.Tensor, gram: torch.Tensor, x_mean: torch.Tensor, *_) -> torch.Tensor:
    """Stands in for awq.search_scale: the site's mean |x|, which the test makes random
    per channel. fold_scales hands it tied across the query heads that share a kv head,
    so the scales are tied as a searched one would be."""
    return x_mean


# qwen2: q/k/v biases; gemma3: norms of 1 + w, the MLP's input normed by
# pre_feedforward_layernorm, norms after attention and the MLP
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_awq_folds_keep_the_function_of_every_layer(
    tmp_path: Path, smollm_folder: Path, monkeypatch: pytest.MonkeyPatch, arch: str
) -> None:
    """Every site of every decoder layer and the output projection (the final norm its
    owner), under grouped-query attention, scaled by random factors in [0.5, 2]: every
    layer's output and the logits are unchanged."""
    from transformers import AutoModelForCausalLM

    if arch == "gemma3":
        folder = tiny_gemma(tmp_path / arch, smollm_folder, vocab_size=512,
                            tie_word_embeddings=False)  # fmt: skip
    else:
        folder = write_tiny_model(tmp_path / arch, smollm_folder, arch=arch, vocab_size=512)
    cfg = read_config(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    biases = [name for name in tensors if name.endswith(".bias")]
    assert bool(biases) == (arch == "qwen2")
    for name in biases:  # transformers initialises biases to zero, which any fold keeps
        tensors[name] = 0.5 * torch.randn(tensors[name].shape, generator=g)

    ids = torch.randint(0, cfg.vocab_size, (1, 24), generator=g)

    def forward() -> list[torch.Tensor]:
        """Each decoder layer's output, then the logits. (Not transformers' last hidden
        state: that is the final norm's output, which the output projection's fold
        rescales.)"""
        model.load_state_dict(tensors)
        outs: list[torch.Tensor] = []
        hooks = [
            layer.register_forward_hook(
                lambda _m, _a, y: outs.append(y[0] if isinstance(y, tuple) else y)
            )
            for layer in model.model.layers
        ]
        with torch.inference_mode():
            outs.append(model(ids).logits)
        for h in hooks:
            h.remove()
        return outs

    before = forward()
    assert len(before) == cfg.num_layers + 1
    stats: defaultdict[str, InputStats] = defaultdict(InputStats)
    sites = [site for layer in llama_sites(cfg, stats, lm_head=True) for site in layer]
    for site in sites:  # one calibration row: its |x| is the site's mean |x|
        site.stats.add(0.5 + 1.5 * torch.rand(1, site.fused(tensors).shape[1], generator=g))
    monkeypatch.setattr(awq, "search_scale", _scale_by_input)
    scales = awq.fold_scales(sites, tensors, QuantSpec(4, "awq", 32, False))
    assert all(s is not None and s.std() > 0.1 for s in scales)
    after = forward()
    for i, (got, want) in enumerate(zip(after, before, strict=True)):
        torch.testing.assert_close(
            got, want, rtol=1e-4, atol=1e-4, msg=lambda m, i=i: f"output {i}: {m}"
        )
