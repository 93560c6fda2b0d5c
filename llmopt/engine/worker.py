"""A worker rank that a driver started on this machine (engine/parallel.py):
`python -m llmopt.engine.worker SETTINGS_JSON`, with torchrun's environment variables
saying which rank it is. It loads its shard and serves the driver's steps until told
to stop (engine.factory.open_engine)."""

from __future__ import annotations

import json
import os
import signal
import sys

from llmopt.engine.config import EngineConfig
from llmopt.engine.factory import open_engine
from llmopt.errors import LlmoptError


def main(argv: list[str]) -> int:
    # Ctrl-C reaches the terminal's whole process group: the driver decides when to
    # stop, and says so (or its exit ends the loop).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    config = EngineConfig(**json.loads(argv[0]))
    try:
        open_engine(config)
    except LlmoptError as e:
        print(f"llmopt: rank {os.environ.get('RANK')}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
