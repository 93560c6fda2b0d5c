"""The engine in a process of its own, as `llmopt serve` runs it.

Why: in one process, the HTTP side's threads slow the engine's steps: two OpenMP
thread pools on the same cores make libgomp stop spinning, and every parallel region
then pays a futex wake-up. In its own process the engine loop is the main thread and
owns the cores' pool.

The child loads the model and runs engine_loop.run_engine_loop; commands go to it
and (outputs, load) come back over a pipe, read by a thread of the parent. If the
child dies, every request in flight fails with a clear error.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

from llmopt.distributed.steps import WorkerLost
from llmopt.engine.config import EngineConfig
from llmopt.engine.engine_loop import Command, EngineLoad, Outputs, run_engine_loop
from llmopt.errors import LlmoptError
from llmopt.tokenizer import Tokenizer

MODEL_LOST = 3  # the child's exit code when a rank of its model is lost (WorkerLost)


def _child(conn: Connection, config: EngineConfig) -> None:
    import signal

    from llmopt.engine.factory import open_engine
    from llmopt.engine.footprint import held_bytes, resident_bytes

    # Ctrl-C and SIGTERM reach the whole process group: the parent decides when to stop
    # (after draining the requests in flight) and says so over the pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        _, engine, loaded = open_engine(config)
    except LlmoptError as e:  # reported by the parent as its own error
        conn.send(("failed", e))
        return
    except Exception as e:
        conn.send(("failed", LlmoptError(f"the engine could not start: {type(e).__name__}: {e}")))
        return
    conn.send(
        (
            "ready", str(loaded.folder), engine.max_context, engine.kv_capacity_tokens,
            engine.kv_cache_description, held_bytes(engine), resident_bytes(),
        )
    )  # fmt: skip

    def receive(block: bool) -> list[Command]:
        commands = []
        if block or conn.poll():
            commands.append(conn.recv())
        while conn.poll():
            commands.append(conn.recv())
        return commands

    def emit(outputs: Outputs, load: EngineLoad) -> None:
        conn.send(("out", outputs, load))

    try:
        with contextlib.suppress(EOFError, BrokenPipeError):  # the parent is gone
            run_engine_loop(engine, receive, emit)
    except WorkerLost as e:
        print(f"llmopt: error: {e}", file=sys.stderr, flush=True)
        sys.exit(MODEL_LOST)


class EngineProcess:
    """The parent's handle: send() commands; outputs reach `deliver` from a reader
    thread; `fail` is called once if the child dies."""

    def __init__(
        self,
        config: EngineConfig,  # its model already resolved to a path by the caller
        deliver: Callable[[Outputs, EngineLoad], None],
        fail: Callable[[Exception], None],
    ) -> None:
        ctx = mp.get_context("spawn")  # fork after torch (or CUDA) init is unsafe
        self._conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(
            target=_child, args=(child_conn, config), name="llmopt-engine", daemon=True
        )
        self.process.start()
        child_conn.close()
        try:
            msg = self._conn.recv()
        except EOFError:
            self.process.join(timeout=5)
            code = self.process.exitcode
            msg = ("failed", LlmoptError(f"the engine process exited while starting ({code})"))
        if msg[0] == "failed":
            self.process.join(timeout=5)
            raise msg[1]
        _, folder, self.max_context, self.kv_capacity_tokens, *rest = msg
        self.kv_cache_description, self.memory_bytes, self.resident_bytes = rest
        self.tokenizer = Tokenizer(Path(folder))
        self._lock = threading.Lock()  # send() is called from the loop and from abort paths
        self._deliver, self._fail = deliver, fail
        self.dead: Exception | None = None
        self._reader = threading.Thread(target=self._read, name="llmopt-engine-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                self.process.join(timeout=1)
                self.dead = RuntimeError(
                    f"the engine process exited (code {self.process.exitcode})"
                )
                self._fail(self.dead)
                return
            self._deliver(msg[1], msg[2])

    def send(self, command: Command) -> None:
        if self.dead is not None:
            self._fail(self.dead)  # fails the request just registered, too
            return
        # A dead child is reported by the reader, to every request.
        with self._lock, contextlib.suppress(BrokenPipeError, OSError):
            self._conn.send(command)

    def join(self, timeout: float | None = None) -> None:
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
