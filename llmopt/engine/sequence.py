"""A request's state as the scheduler and KV block manager see it: token ids, how many
of them have keys/values in the cache, and which cache blocks hold them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from llmopt.engine.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to be recomputed
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]  # prompt followed by generated tokens
    num_prompt_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    arrival_time: float = field(default_factory=time.monotonic)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # leading tokens whose keys/values are in the cache
    num_cached_tokens: int = 0  # of those, how many came from the prefix cache
    block_table: list[int] = field(default_factory=list)  # cache block ids, in order
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of full blocks
    # Leading blocks given back because no layer's window reaches them any more (their
    # entries in block_table are HOLE): BlockManager.release_behind_window.
    released_blocks: int = 0
    # Speculative tokens proposed after token_ids, to be verified in the next step; not
    # part of the sequence until accepted.
    draft_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_prompt(cls, request_id: str, prompt: list[int], params: SamplingParams) -> Sequence:
        if not prompt:
            raise ValueError("a sequence needs at least one prompt token")
        return cls(request_id, list(prompt), len(prompt), params)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens still to run through the model: the prompt's rest, or the last sampled one."""
        return self.num_tokens - self.num_computed_tokens

    def append(self, token: int) -> None:
        self.token_ids.append(token)
