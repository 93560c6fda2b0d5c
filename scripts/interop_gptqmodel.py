"""Does another tool read the GPTQ / AWQ checkpoints llmopt writes? Two halves:

1. In a virtualenv with GPTQModel (7.6 was used: `pip install "gptqmodel==7.6.*"
   transformers torch==2.13.0`; it runs on the CPU):
       python scripts/interop_gptqmodel.py tool CKPT OUT_DIR [--prompt-ids 1,2,3]
   loads CKPT with GPTQModel's plain-torch kernels in fp16, greedy-decodes 16 tokens
   from the prompt ids, and writes OUT_DIR/tool.json and, for every quantized linear,
   the weight as GPTQModel's own code dequantizes it (OUT_DIR/dequant.safetensors).
2. In llmopt's environment:
       python scripts/interop_gptqmodel.py compare CKPT OUT_DIR
   unpacks CKPT with llmopt's reader, counts the linears that are bit-exact against
   the tool's, and decodes the same prompt with llmopt (fp32) for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch


def tool_side(ckpt: Path, out: Path, prompt: list[int], tokens: int) -> None:
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # its default pool breaks on 2 cores
    os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")  # eager: its dequantize code as written
    import gptqmodel
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from safetensors.torch import save_file

    method = json.loads((ckpt / "config.json").read_text())["quantization_config"]["quant_method"]
    backend = BACKEND.AWQ_TORCH if method == "awq" else BACKEND.GPTQ_TORCH
    model = GPTQModel.load(str(ckpt), device="cpu", backend=backend, dtype=torch.float16).model
    ids = torch.tensor([prompt])
    weights = {}
    with torch.inference_mode():
        generated = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
            min_new_tokens=tokens, do_sample=False,
        )[0, len(prompt):].tolist()  # fmt: skip
        for name, m in model.named_modules():
            if not isinstance(m, BaseQuantLinear):
                continue
            m.scales = m.scales.float()  # fp32 products: exact for fp16 scales x small ints
            if hasattr(m, "dequantize_weight"):  # GPTQ
                w = m.dequantize_weight()
            else:  # AWQ
                from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

                w = dequantize_gemm(m.qweight, m.qzeros, m.scales, m.bits, m.group_size)
            weights[name] = w.float().t().contiguous()  # (out, in)
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "dequant.safetensors"))
    report = {"gptqmodel": gptqmodel.__version__, "prompt_ids": prompt, "tokens": generated}
    (out / "tool.json").write_text(json.dumps(report))


def compare_side(ckpt: Path, out: Path) -> None:
    from safetensors.torch import load_file

    from llmopt import LLM, SamplingParams
    from llmopt.loader.hf import read_tensors
    from llmopt.loader.quantized import unpack_checkpoint

    qcfg = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    ours = unpack_checkpoint(read_tensors(ckpt), qcfg)
    theirs = load_file(str(out / "dequant.safetensors"))
    exact = sum(torch.equal(ours[f"{n}.weight"].dequantize(), w) for n, w in theirs.items())
    tool = json.loads((out / "tool.json").read_text())
    llm = LLM(ckpt, dtype="float32", prefix_cache=False)
    greedy = SamplingParams(temperature=0, max_tokens=len(tool["tokens"]), ignore_eos=True)
    mine = llm.generate([tool["prompt_ids"]], greedy)[0].token_ids
    agree = next(
        (i for i, (a, b) in enumerate(zip(mine, tool["tokens"], strict=True)) if a != b), len(mine)
    )
    print(json.dumps({
        "checkpoint": str(ckpt), "quant_method": qcfg["quant_method"],
        "tool": f"GPTQModel {tool['gptqmodel']}", "linears": len(theirs),
        "bit_exact": exact, "greedy_tokens": len(mine), "leading_tokens_agree": agree,
    }))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("side", choices=("tool", "compare"))
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--prompt-ids", default="1,504,3458,314,253,1345,282,7046,30")
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args()
    if args.side == "tool":
        prompt = [int(t) for t in args.prompt_ids.split(",")]
        tool_side(args.ckpt, args.out, prompt, args.tokens)
    else:
        compare_side(args.ckpt, args.out)


if __name__ == "__main__":
    main()
