"""Which decoder layers a quantized model's error comes from.

Each layer of the quantized model in turn is replaced by the reference's (its norms and
linears together, so that AWQ's scales, folded within a layer, stay consistent), and the
model is scored again against the reference: the KL divergence it loses is that layer's
share. Shares need not add up to 1 (errors compound across layers, and the embedding
has its own).

    python scripts/layer_attribution.py QUANTIZED --reference smollm2-135m-instruct \
        [--text FILE] [--tokens 2048] [--threads 1]

One JSON line per layer (and one for the whole model first), on stdout.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llmopt.bench.perplexity import evaluate
from llmopt.corpus import held_out_text, read_text
from llmopt.engine.config import EngineConfig
from llmopt.engine.factory import load

WINDOW, STRIDE = 512, 256


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("model", help="the quantized model (checkpoint folder or GGUF file)")
    ap.add_argument("--reference", required=True, help="the model it was quantized from")
    ap.add_argument("--text", type=Path, help="default: pydoc's held-out half")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    text = read_text(a.text, held_out_text, "--text")
    cfg = EngineConfig(model=a.model, threads=a.threads)
    _, quantized = load(cfg)
    # The reference twice: in bf16, as `bench --perplexity` scores against it, and in
    # fp32, the activations' type of the quantized model, whose layers it lends.
    _, reference = load(cfg.replace(model=a.reference, dequantize=True))
    _, donor = load(cfg.replace(model=a.reference, dequantize=True, dtype="float32"))
    model, layers = quantized.model, quantized.model.layers

    def kl() -> float:
        scores = evaluate(
            model, quantized.tokenizer, text, a.tokens, WINDOW, STRIDE, reference.model
        )
        return scores["kl_divergence"]

    whole = kl()
    print(json.dumps({"layer": None, "kl": whole}), flush=True)
    for i in range(len(layers)):
        own = layers[i]
        layers[i] = donor.model.layers[i]
        restored = kl()
        layers[i] = own
        share = (whole - restored) / whole
        print(json.dumps({"layer": i, "kl": restored, "share": share}), flush=True)


if __name__ == "__main__":
    main()
