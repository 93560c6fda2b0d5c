"""On-disk layouts of quantized linears, by the `quant_method` of config.json's
quantization_config. Each module packs a QuantizedWeight into named tensors
(`<linear>.<suffix>`) and unpacks them back, bit-exact."""

from __future__ import annotations

from types import ModuleType

from llmopt.errors import ModelFormatError
from llmopt.weights.layouts import awq, gptq, native

LAYOUTS: dict[str, ModuleType] = {"llmopt": native, "gptq": gptq, "awq": awq}


def layout_for(quant_method: str) -> ModuleType:
    try:
        return LAYOUTS[quant_method]
    except KeyError:
        raise ModelFormatError(
            f"quantization method '{quant_method}' is not supported; supported: "
            f"{', '.join(sorted(LAYOUTS))}"
        ) from None
