"""Entry point: registers the subcommands and applies the one error policy.

A `LlmoptError` becomes one line on stderr and its exit code; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import sys

import typer

from llmopt.cli import models, pull, run
from llmopt.errors import LlmoptError

app = typer.Typer(
    name="llmopt",
    help="Fast local LLM inference: run, pull and manage models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("run")(run.run)
app.command("pull")(pull.pull_cmd)
app.command("models")(models.list_models)
app.command("rm")(models.remove)


def main() -> None:
    try:
        app()
    except LlmoptError as e:
        print(f"error: {e.message}", file=sys.stderr)
        sys.exit(e.exit_code)
