"""Errors a user can act on.

Every failure caused by the user's input is a :class:`RepconvError`. Its message is one line that says
what is wrong and how to fix it; the CLI prints it and exits with code 2 (``--debug`` adds the traceback).
"""

from __future__ import annotations


class RepconvError(Exception):
    """A problem with the user's input or environment, reported as one line."""

    kind = "error"

    def __init__(self, message: str, hint: str | None = None):
        self.message = message.strip().rstrip(".")
        self.hint = hint.strip().rstrip(".") if hint else None
        super().__init__(str(self))

    def __str__(self) -> str:
        text = self.message
        if self.hint:
            text += f"; {self.hint}"
        return " ".join(text.split()) + "."


class InputFileError(RepconvError):
    """A file that is missing, empty, truncated, of the wrong kind or unsafe to load."""

    kind = "input-file"


class ArchError(RepconvError):
    """An architecture name that resolves to nothing, or weights that do not fit it."""

    kind = "arch"


class TraceError(RepconvError):
    """A model torch.fx cannot trace."""

    kind = "trace"


class PlanError(RepconvError):
    """A plan, policy or selection that does not fit the model."""

    kind = "plan"


class NothingToReplace(PlanError):
    """The chosen method finds nothing to change in this model."""

    kind = "nothing-to-replace"


class VerificationError(RepconvError):
    """A numerical check (fold parity, export parity, round trip) that failed."""

    kind = "verification"


class DataError(RepconvError):
    """A data folder or dataset that cannot be used."""

    kind = "data"


class DependencyError(RepconvError):
    """An optional dependency or device (timm, TensorRT, a GPU) that is missing."""

    kind = "dependency"


class OutputError(RepconvError):
    """An output path that cannot be written."""

    kind = "output"


class OptionError(RepconvError):
    """A command-line option or argument value that does not parse or does not fit."""

    kind = "option"
