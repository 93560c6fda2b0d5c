"""llmopt: fast local LLM inference.

`from llmopt import LLM, SamplingParams` is the offline batch API; the names are
imported on first use so that `import llmopt.errors` and the like stay light.
"""

from typing import Any

__all__ = ["LLM", "Completion", "EngineConfig", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name in ("LLM", "Completion"):
        from llmopt.engine import llm

        return getattr(llm, name)
    if name == "EngineConfig":
        from llmopt.engine.config import EngineConfig

        return EngineConfig
    if name == "SamplingParams":
        from llmopt.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'llmopt' has no attribute {name!r}")
