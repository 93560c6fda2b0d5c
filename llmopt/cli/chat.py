"""The chat session behind `llmopt run`: history, slash commands, and streaming output.

The REPL reads with `input()` (readline gives line editing and history). A line
ending in a backslash continues on the next line, and a block between two lines of
triple quotes is sent as one message. Ctrl-C stops the current answer and keeps the
chat; Ctrl-D or /exit leaves it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import threading

from rich.console import Console

from llmopt.cli.common import format_stats
from llmopt.engine.engine import Engine
from llmopt.engine.outputs import Delta, RequestStats
from llmopt.engine.sampling_params import SamplingParams
from llmopt.errors import LlmoptError, UsageError

HELP = """Commands:
  /help                 this help
  /set NAME VALUE       temperature, top_k, top_p, min_p, repetition_penalty,
                        presence_penalty, frequency_penalty, max_tokens, seed, stop;
                        VALUE 'none' unsets max_tokens, seed and stop
  /system TEXT          set the system message (clears the history)
  /show                 current settings
  /stats                timings of the last answer
  /clear                forget the conversation
  /exit                 leave (or Ctrl-D)
End a line with \\ to continue it, or wrap several lines in \"\"\" ... \"\"\".
Ctrl-C stops an answer."""

_SETTABLE = {f.name: f.type for f in dataclasses.fields(SamplingParams) if f.name != "ignore_eos"}


class Chat:
    def __init__(
        self,
        engine: Engine,
        name: str,
        params: SamplingParams,
        system: str | None,
        console: Console,
    ) -> None:
        self.engine = engine
        self.name = name
        self.params = params
        self.system = system
        self.console = console
        self.history: list[dict[str, str]] = []
        self.last_stats: RequestStats | None = None

    def messages(self, user: str) -> list[dict[str, str]]:
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        return [*sys_msg, *self.history, {"role": "user", "content": user}]

    def prompt_ids(self, user: str, raw: bool = False) -> list[int]:
        tok = self.engine.tokenizer
        if raw:
            return tok.encode(user, add_bos=None)
        return tok.encode_chat(self.messages(user))

    def stream(self, ids: list[int], echo: bool = True) -> tuple[str, Delta]:
        """Generate, printing deltas to stdout as they come; Ctrl-C ends with 'abort'."""
        pieces: list[str] = []
        stop = threading.Event()
        # While generating, Ctrl-C only raises a flag that the engine checks between
        # tokens, so the answer ends cleanly with its stats instead of a traceback.
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, lambda *_: stop.set()) if in_main else None
        last: Delta | None = None
        try:
            for delta in self.engine.generate(ids, self.params, stop.is_set):
                pieces.append(delta.text)
                if echo and delta.text:
                    sys.stdout.write(delta.text)
                    sys.stdout.flush()
                last = delta
        finally:
            if in_main:
                signal.signal(signal.SIGINT, previous)
        assert last is not None
        self.last_stats = last.stats
        return "".join(pieces), last

    def ask(self, user: str) -> None:
        ids = self.prompt_ids(user)
        text, last = self.stream(ids)
        print()
        if last.finish_reason == "abort":
            self.console.print("[dim](stopped)[/dim]")
        self.history += [
            {"role": "user", "content": user},
            {"role": "assistant", "content": text},
        ]

    def command(self, line: str) -> bool:
        """Handle a slash command; return False to leave the chat."""
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        if cmd in ("/exit", "/quit", "/bye"):
            return False
        if cmd in ("/help", "/?"):
            self.console.print(HELP, highlight=False)
        elif cmd == "/clear":
            self.history.clear()
            self.console.print("[dim]conversation cleared[/dim]")
        elif cmd == "/system":
            self.system = arg or None
            self.history.clear()
            self.console.print("[dim]system message set; conversation cleared[/dim]")
        elif cmd == "/show":
            settings = {k: getattr(self.params, k) for k in _SETTABLE}
            self.console.print(f"model {self.name}; system {self.system!r}; {settings}")
        elif cmd == "/stats":
            s = self.last_stats
            self.console.print(format_stats(s) if s else "no answer yet", highlight=False)
        elif cmd == "/set":
            self._set(arg)
        else:
            self.console.print(f"unknown command {cmd}; /help lists them")
        return True

    def _set(self, arg: str) -> None:
        key, _, value = arg.partition(" ")
        value = value.strip()
        if key not in _SETTABLE or not value:
            raise UsageError(f"usage: /set NAME VALUE with NAME one of {', '.join(_SETTABLE)}")
        parsed: object
        if value.lower() == "none" and key in ("max_tokens", "seed", "stop"):
            parsed = () if key == "stop" else None
        elif key == "stop":
            parsed = (*self.params.stop, value)
        else:
            kind = int if key in ("top_k", "max_tokens", "seed") else float
            try:
                parsed = kind(value)
            except ValueError:
                raise UsageError(f"{key} takes a number, not {value!r}") from None
        self.params = dataclasses.replace(self.params, **{key: parsed})
        self.console.print(f"[dim]{key} = {parsed!r}[/dim]")

    def read_message(self) -> str | None:
        """One user message (maybe multi-line); None at end of input."""
        try:
            line = input(">>> ")
        except EOFError:
            return None
        if line.strip() == '"""':
            lines = []
            while (more := input("... ")).strip() != '"""':
                lines.append(more)
            return "\n".join(lines)
        parts = []
        while line.endswith("\\"):
            parts.append(line[:-1])
            line = input("... ")
        parts.append(line)
        return "\n".join(parts)

    def repl(self) -> None:
        from llmopt.engine.footprint import held_bytes, resident_bytes

        held, resident = held_bytes(self.engine) / 1e6, resident_bytes() / 1e6
        self.console.print(
            f"[bold]{self.name}[/bold] ready (context {self.engine.max_context} tokens, "
            f"KV cache {self.engine.kv_capacity_tokens} tokens; weights and KV cache "
            f"{held:.0f} MB, resident {resident:.0f} MB). /help for commands, Ctrl-D to leave.",
            highlight=False,
        )
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
        while True:
            try:
                msg = self.read_message()
            except KeyboardInterrupt:
                self.console.print("\n[dim](use /exit or Ctrl-D to leave)[/dim]")
                continue
            except EOFError:
                msg = None
            if msg is None:
                print()
                return
            if not msg.strip():
                continue
            try:
                if msg.startswith("/"):
                    if not self.command(msg.strip()):
                        return
                else:
                    self.ask(msg)
            except LlmoptError as e:
                self.console.print(f"[red]error:[/red] {e.message}", highlight=False)
