"""Error types and the one table that maps them to exit codes.

Library code raises these; only the CLI turns them into a message on stderr and an exit code.
Every message is one line: what is wrong, then (after " — ") what to do about it.
"""

from __future__ import annotations


class QuantkitError(Exception):
    """Base for every error quantkit reports to a user. ``hint`` says what to do."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} — {self.hint}" if self.hint else self.message


class InputError(QuantkitError):
    """Bad input given by the user: a path, an option, a file that is not what it claims."""


class CheckpointError(InputError):
    """A model checkpoint that cannot be read: missing config, bad safetensors, missing tensors."""


class UnsupportedArchitectureError(InputError):
    """No converter for this architecture."""


class TokenizerError(InputError):
    """A tokenizer that cannot be converted faithfully."""


class GGUFFormatError(InputError):
    """A GGUF file that is malformed."""


class GGUFLoadError(InputError):
    """A GGUF quantkit would write that llama.cpp cannot load: refused before it gets its name."""


class OutputExistsError(InputError):
    """The output path exists and --force was not given."""


class EngineError(QuantkitError):
    """An inference engine failed to load or run an artifact."""

    exit_code = 3


class GateFailed(QuantkitError):
    """A validation gate did not hold (the report says which)."""

    exit_code = 1


class Interrupted(KeyboardInterrupt):
    """SIGTERM (the CLI's handler raises it), treated like Ctrl-C: temporaries are removed, exit
    130. A KeyboardInterrupt, not a QuantkitError, on purpose: the ``except Exception`` and
    ``except QuantkitError`` blocks that turn a library's failure into a one-line error (loading a
    tokenizer, an engine worker) must not catch an interruption and report it as bad input."""

    exit_code = 130

    def __init__(self, message: str = "interrupted", hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint  # the same attributes as a QuantkitError


# Exit codes by error type, most specific first; the CLI walks this table (docs/decisions.md,
# decision 8: one table maps error types to messages and exit codes).
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (Interrupted, 130),
    (KeyboardInterrupt, 130),
    (GateFailed, 1),
    (EngineError, 3),
    (QuantkitError, 2),
)


def exit_code_for(exc: BaseException) -> int:
    for kind, code in EXIT_CODES:
        if isinstance(exc, kind):
            return code
    return 1
