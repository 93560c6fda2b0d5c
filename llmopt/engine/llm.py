"""The offline batch API:

from llmopt import LLM, SamplingParams
llm = LLM("smollm2-135m-instruct")
for out in llm.generate(["Hello", "Bonjour"], SamplingParams(temperature=0)):
    print(out.text)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmopt.engine.config import EngineConfig
from llmopt.engine.factory import open_engine
from llmopt.engine.outputs import RequestStats
from llmopt.engine.sampling_params import SamplingParams


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: RequestStats


class LLM:
    """A model loaded once, generating for many prompts at a time with continuous batching."""

    def __init__(
        self, model: str | Path | None = None, config: EngineConfig | None = None, **settings: Any
    ) -> None:
        """model: a registry name, .gguf file or Hugging Face folder (None: the default);
        settings: EngineConfig's fields (device, dtype, max_num_seqs, ...), over `config`."""
        config = (config or EngineConfig()).replace(**settings)
        if model is not None:
            config = config.replace(model=str(model))
        self.config = config
        self.name, self.engine, self.loaded = open_engine(config)

    def close(self) -> None:
        """Stop a tensor-parallel model's worker ranks now rather than at exit."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def encode(self, prompt: str | list[int], chat: bool) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        tok = self.loaded.tokenizer
        if chat:
            return tok.encode_chat([{"role": "user", "content": prompt}])
        return tok.encode(prompt)

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        params: SamplingParams | None = None,
        chat: bool = False,
    ) -> list[Completion]:
        """Generate for every prompt (text, or token ids) at once; results in prompt order.
        chat=True wraps each text prompt as a user message in the model's chat template."""
        if isinstance(prompts, str):
            prompts = [prompts]
        params = params or SamplingParams()
        engine = self.engine
        ids = [engine.add_request(self.encode(p, chat), params) for p in prompts]
        texts: dict[str, list[str]] = {rid: [] for rid in ids}
        tokens: dict[str, list[int]] = {rid: [] for rid in ids}
        results: dict[str, Completion] = {}
        while engine.has_unfinished():
            for rid in engine.step():
                for d in engine.take(rid):
                    texts[rid].append(d.text)
                    tokens[rid] += d.token_ids
                    if d.finish_reason is not None:
                        assert d.stats is not None
                        results[rid] = Completion(
                            "".join(texts[rid]), tokens[rid], d.finish_reason, d.stats
                        )
        return [results[rid] for rid in ids]
