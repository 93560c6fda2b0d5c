"""Entry point: registers the subcommands and applies the one error policy.

A `LlmoptError` becomes one line on stderr and its exit code; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import typer

from llmopt.cli import bench, cluster, models, pull, quantize, router, run, serve
from llmopt.errors import LlmoptError

app = typer.Typer(
    name="llmopt",
    help="Fast local LLM inference: run, serve, bench, pull and manage models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _user_errors(f: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except LlmoptError as e:
            print(f"error: {e.message}", file=sys.stderr)
            raise typer.Exit(e.exit_code) from None

    return wrapper


app.command("quantize")(_user_errors(quantize.quantize))
app.command("run")(_user_errors(run.run))
app.command("serve")(_user_errors(serve.serve))
app.command("router")(_user_errors(router.router))
app.command("cluster")(_user_errors(cluster.cluster))
app.command("bench")(_user_errors(bench.bench))
app.command("pull")(_user_errors(pull.pull_cmd))
app.command("models")(_user_errors(models.list_models))
app.command("rm")(_user_errors(models.remove))


def main() -> None:
    app()
