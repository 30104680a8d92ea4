"""One exception family for everything a user can get wrong.

Each error names the problem and says what to do. The CLI prints
``str(error)`` without a traceback; the handlers put it in the partition's
failure record, so a bad partition is reported instead of sinking the run.
"""


class CaiError(Exception):
    """Base class: a problem the user can fix, with a hint how."""

    def __init__(self, problem: str, hint: str = ""):
        self.problem = problem
        self.hint = hint
        super().__init__(f"{problem}" + (f" ({hint})" if hint else ""))


class WeightsError(CaiError):
    """A weights or checkpoint file is missing, truncated or not what it claims."""


class UnsafePickleError(CaiError):
    """A pickle asked for something outside the converter's allow-list."""


class InputError(CaiError):
    """Images or magnitudes of the wrong shape, dtype or values."""


class PartitionError(CaiError):
    """A partition file is missing, corrupt, truncated or malformed."""


class PayloadError(CaiError):
    """A run payload has missing or wrong fields; lists every problem at once."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(
            "bad run payload: " + "; ".join(self.problems),
            "fix the fields named above and start the run again",
        )


class StoreError(CaiError):
    """A bucket, prefix, key or folder that cannot be read or written."""
