"""EngineConfig: every setting of an engine, declared once.

`LLM`, `run`, `serve`, `bench` and the engine process all build one and hand it to
`engine.factory.open_engine`. Each field's metadata names its command-line flag and
help, so that the CLI maps flags onto fields in one place (cli/engine_options.py)
and a bad value is refused here with the flag named, whoever built the config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from llmopt.device import check_device_name, check_dtype_name
from llmopt.errors import UsageError
from llmopt.layers.kv_types import check_kv_type_name

POLICIES = ("continuous", "dynamic", "static")
SPECULATIVE_METHODS = ("off", "ngram", "draft")
KV_CACHE_TYPES = ("kv_cache_dtype", "k_cache_dtype", "v_cache_dtype")  # the cache's types
# speculative decoding's settings
SPECULATION = ("speculative", "draft", "num_speculative_tokens", "speculative_adaptive")
# the split of a model over processes
PARALLELISM = (
    "tensor_parallel_size", "exact_tensor_parallel", "pipeline_parallel_size",
    "pipeline_microbatches",
)  # fmt: skip


def setting(default: Any, flag: str | None = None, help: str = "") -> Any:
    """A field with its CLI flag (None: not a flag) and help text."""
    return field(default=default, metadata={"flag": flag, "help": help})


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = setting(None, help="Registry name, .gguf file or HF folder.")
    device: str = setting("auto", "--device", "auto, cpu or cuda.")
    dtype: str = setting("auto", "--dtype", "auto, bfloat16, float16 or float32.")
    threads: int | None = setting(None, "--threads", "CPU threads for torch.")
    dequantize: bool = setting(
        False,
        "--dequantize",
        "Run a GGUF file's weights dequantized to --dtype (default on CPU: its "
        "Q4_0/Q4_1/Q8_0 blocks as they are, with int kernels).",
    )
    max_context: int | None = setting(None, "--ctx-size", "Cap the context length.")
    kv_cache_memory: float | None = setting(
        None, "--kv-cache-memory", "GB for the KV cache (default: 10% of free RAM)."
    )
    kv_cache_dtype: str = setting(
        "auto",
        "--kv-cache-dtype",
        "KV cache element type: auto, fp32, bf16, fp16, fp8 or int8 (auto: fp32 on CPU, "
        "the model's dtype on CUDA).",
    )
    k_cache_dtype: str | None = setting(
        None, "--k-cache-dtype", "The keys' type, where it differs from --kv-cache-dtype."
    )
    v_cache_dtype: str | None = setting(
        None, "--v-cache-dtype", "The values' type, where it differs from --kv-cache-dtype."
    )
    block_size: int = setting(16, None, "Tokens per KV cache block.")
    batching: str = setting("continuous", "--batching", "continuous, dynamic or static.")
    max_num_seqs: int = setting(64, "--max-num-seqs", "Most requests in a batch.")
    max_num_batched_tokens: int = setting(
        512, "--max-num-batched-tokens", "Token budget of one step (prefill chunk size)."
    )
    max_wait_s: float = setting(1.0, None, "Static batching: the longest a partial batch waits.")
    prefix_cache: bool = setting(True, "--prefix-cache/--no-prefix-cache", "Reuse shared prefixes.")
    speculative: str | None = setting(
        None,
        "--speculative",
        "Speculative decoding: off, ngram (prompt lookup) or draft (--draft's model). "
        "Default: draft when --draft is given, else off.",
    )
    draft: str | None = setting(
        None, "--draft", "Draft model for --speculative draft (registry name, .gguf or folder)."
    )
    num_speculative_tokens: int = setting(
        8, "--num-speculative-tokens", "Most tokens a sequence proposes a step (adapted below it)."
    )
    speculative_adaptive: bool = setting(
        True,
        "--speculative-adaptive/--no-speculative-adaptive",
        "Propose as many tokens as measured acceptance and step cost say pay (off: always "
        "--num-speculative-tokens).",
    )
    tensor_parallel_size: int = setting(
        1,
        "--tensor-parallel-size",
        "Split the model over this many ranks (processes), each with its share of the "
        "heads, MLP and vocabulary; started by llmopt on this machine, or joined under "
        "torchrun.",
    )
    exact_tensor_parallel: bool = setting(
        True,
        "--exact-tensor-parallel/--no-exact-tensor-parallel",
        "Tensor parallelism whose output is one process's bit for bit: o_proj and "
        "down_proj split by outputs, four all-gathers a layer (off: Megatron's split by "
        "inputs, two all-reduces a layer, equal up to rounding).",
    )
    pipeline_parallel_size: int = setting(
        1,
        "--pipeline-parallel-size",
        "Split the model's layers into this many stages (processes), each with its "
        "layers' KV cache; started by llmopt on this machine, or joined under torchrun.",
    )
    pipeline_microbatches: int | None = setting(
        None,
        "--pipeline-microbatches",
        "Micro-batches a step is cut into through the pipeline's stages (default: one per stage).",
    )

    def __post_init__(self) -> None:
        check_device_name(self.device)
        check_dtype_name(self.dtype)
        checks = [
            ("threads", self.threads is None or self.threads >= 1, "must be at least 1"),
            ("max_context", self.max_context is None or self.max_context >= 1, "must be positive"),
            (
                "kv_cache_memory",
                self.kv_cache_memory is None or self.kv_cache_memory > 0,
                "must be a positive number of GB",
            ),
            ("block_size", self.block_size >= 1, "must be positive"),
            ("batching", self.batching in POLICIES, f"must be one of {', '.join(POLICIES)}"),
            ("max_num_seqs", self.max_num_seqs >= 1, "must be at least 1"),
            ("max_num_batched_tokens", self.max_num_batched_tokens >= 1, "must be at least 1"),
            ("max_wait_s", self.max_wait_s >= 0, "must not be negative"),
            (
                "speculative",
                self.speculative in (None, *SPECULATIVE_METHODS),
                f"must be one of {', '.join(SPECULATIVE_METHODS)}",
            ),
            ("num_speculative_tokens", 1 <= self.num_speculative_tokens <= 64, "must be 1 to 64"),
            ("tensor_parallel_size", self.tensor_parallel_size >= 1, "must be at least 1"),
            ("pipeline_parallel_size", self.pipeline_parallel_size >= 1, "must be at least 1"),
            (
                "pipeline_microbatches",
                self.pipeline_microbatches is None or self.pipeline_microbatches >= 1,
                "must be at least 1",
            ),
        ]
        for name in KV_CACHE_TYPES:
            if getattr(self, name) is not None:
                check_kv_type_name(getattr(self, name), self.describe(name))
        for name, ok, message in checks:
            if not ok:
                raise UsageError(f"{self.describe(name)} {message}, not {getattr(self, name)!r}")
        if self.speculation == "draft" and self.draft is None:
            raise UsageError("--speculative draft needs a draft model: --draft MODEL")
        if self.tensor_parallel_size > 1 and self.pipeline_parallel_size > 1:
            raise UsageError(
                "--tensor-parallel-size and --pipeline-parallel-size do not combine yet: "
                "give one of them"
            )
        if self.speculation != "draft" and self.draft is not None:
            raise UsageError(f"--draft is used by --speculative draft, not {self.speculation}")

    @classmethod
    def describe(cls, name: str) -> str:
        """How a setting is named to the user: its flag where it has one."""
        flag = _FIELDS[name].metadata["flag"]
        return flag.partition("/")[0] if flag else name

    @property
    def batched(self) -> bool:
        """Whether the engine serves several sequences at once (it picks the dtype)."""
        return self.max_num_seqs > 1

    @property
    def speculation(self) -> str:
        """The speculative decoding method in effect: off, ngram or draft."""
        if self.speculative is None:
            return "off" if self.draft is None else "draft"
        return self.speculative

    @property
    def kv_types(self) -> tuple[str, str]:
        """The KV cache's (K, V) type names."""
        return (
            self.k_cache_dtype or self.kv_cache_dtype,
            self.v_cache_dtype or self.kv_cache_dtype,
        )

    def flags(self, *names: str) -> list[str]:
        """The settings `names` that differ from their defaults, as command-line flags
        (`--flag=value`, or a switch's `--flag` / `--no-flag`), to hand to another llmopt
        command."""
        out = []
        for n in names:
            value = getattr(self, n)
            if value == _FIELDS[n].default:
                continue
            if isinstance(value, bool):
                on, _, off = _FIELDS[n].metadata["flag"].partition("/")
                out.append(on if value else off)
            else:
                out.append(f"{self.describe(n)}={value}")
        return out

    @property
    def ranks(self) -> int:
        """The processes the model runs on (tensor or pipeline parallelism)."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)


_FIELDS = {f.name: f for f in dataclasses.fields(EngineConfig)}
