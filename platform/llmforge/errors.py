"""The project's exception types.

Every error the user can cause is one of these, and its message says what was wrong, where,
and what to do about it. The CLI prints the message in one paragraph and exits with code 2.
"""


class LLMForgeError(Exception):
    """Base class: a problem the user can fix. ``exit_code`` is what the CLI returns."""

    exit_code = 2

    def __init__(self, what: str, *, fix: str | None = None):
        self.what = what
        self.fix = fix
        super().__init__(what if not fix else f"{what} Fix: {fix}")


class ConfigError(LLMForgeError):
    """A config file or override that does not validate."""


class InputError(LLMForgeError):
    """Input data that is missing, empty or unusable."""


class OutputExistsError(LLMForgeError):
    """An output location that already holds results."""


class StorageError(LLMForgeError):
    """A path or URI that cannot be read or written."""


class TrainingDiverged(LLMForgeError):
    """The loss stayed NaN/Inf for ``train.max_nonfinite_in_row`` micro-batches in a row."""

    exit_code = 1


class LeaseHeld(LLMForgeError):
    """Another live job holds the output or run this job would write."""
