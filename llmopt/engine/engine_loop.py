"""The loop that owns an engine on behalf of asynchronous clients: apply the commands
that arrived (add a request, abort one), run a step, hand the deltas out; wait for
commands when idle. A step that fails ends the requests in flight with the error,
and the loop keeps serving.

It runs in a thread of the server (AsyncEngine's default) or as the main thread of
an engine process (engine_process.py); only the transport of commands and outputs
differs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from llmopt.distributed.steps import WorkerLost
from llmopt.engine.engine import Engine
from llmopt.engine.outputs import Delta

# ("add", request_id, prompt_ids, params) | ("abort", request_id) | ("stop",)
Command = tuple
Outputs = dict[str, list[Delta] | list[Exception]]


class EngineLoad(NamedTuple):
    """What the engine holds right now, for metrics and backpressure."""

    running: int  # requests in the running batch
    waiting: int  # accepted, not yet scheduled (or preempted)
    kv_blocks_used: int  # referenced by a request (cached, unreferenced blocks are free)
    kv_blocks_total: int
    kv_block_size: int  # tokens a block holds
    prefix_hit_tokens: int
    prefix_miss_tokens: int
    prefix_cached_blocks: int = 0  # full blocks the prefix cache holds (in use or not)


def load_of(engine: Engine) -> EngineLoad:
    blocks, sched = engine.blocks, engine.scheduler
    return EngineLoad(
        running=len(sched.running),
        waiting=len(sched.waiting),
        kv_blocks_used=blocks.num_blocks - blocks.num_free_blocks,
        kv_blocks_total=blocks.num_blocks,
        kv_block_size=blocks.block_size,
        prefix_hit_tokens=blocks.hit_tokens,
        prefix_miss_tokens=blocks.miss_tokens,
        prefix_cached_blocks=len(blocks.cached),
    )


def run_engine_loop(
    engine: Engine,
    receive: Callable[[bool], list[Command]],  # block=True: wait for at least one
    emit: Callable[[Outputs, EngineLoad], None],
) -> None:
    """Serve commands until ("stop",) arrives, or a rank of the model is lost
    (WorkerLost, raised after failing every request with it)."""
    while True:
        outputs: Outputs = {}
        for command in receive(not engine.has_unfinished()):
            kind, *args = command
            if kind == "stop":
                return
            if kind == "abort":
                rid = args[0]
                engine.abort(rid)
                if rid in engine.requests:
                    engine.take(rid)  # drop its final delta: nobody reads it
            else:
                rid, prompt_ids, params = args
                try:
                    engine.add_request(prompt_ids, params, request_id=rid)
                except Exception as e:  # refused (too long for the cache, a duplicate id)
                    outputs[rid] = [e]
        if engine.has_unfinished():
            try:
                for rid in engine.step():
                    outputs[rid] = engine.take(rid)
            except Exception as e:  # a failed step fails its requests, not the server
                for rid in list(engine.requests):
                    engine.abort(rid)
                    engine.take(rid)
                    outputs[rid] = [e]
                if isinstance(e, WorkerLost):  # the model is gone with its rank
                    emit(outputs, load_of(engine))
                    raise
        emit(outputs, load_of(engine))
