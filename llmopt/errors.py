"""User-facing errors: one clear line (what went wrong, what to do) and an exit code.

The CLI turns any `LlmoptError` into that line on stderr; everything else is a
bug and keeps its traceback.
"""


class LlmoptError(Exception):
    """An error caused by the user's input or environment, not by llmopt."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(LlmoptError):
    """Bad arguments or options."""

    exit_code = 2


class ModelNotFoundError(LlmoptError):
    """A model name or path that resolves to nothing."""

    exit_code = 3


class ModelFormatError(LlmoptError):
    """A model file that is corrupt, truncated or of an unsupported kind."""

    exit_code = 4


class ContextLengthError(LlmoptError):
    """A prompt (plus the tokens asked for) that does not fit the context window."""

    exit_code = 5


class DownloadError(LlmoptError):
    """A fetch that failed or produced a file whose checksum does not match."""

    exit_code = 6
