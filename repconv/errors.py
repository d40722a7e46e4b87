"""Errors a user can act on.

Every failure caused by the user's input is a :class:`RepconvError` subclass. Its message is one line that
says what is wrong and how to fix it; the CLI prints it and exits with code 2 (``--debug`` adds the
traceback). API messages never name a command-line flag: :class:`OptionError` carries the parameter's
name and value, and the CLI shows them as the flag the user typed.
"""

from __future__ import annotations

from typing import Any


class RepconvError(Exception):
    """A problem with the user's input or environment, reported as one line. Raise a subclass.

    ``option`` names the API parameter that fixes it; ``{option}`` in the message or hint reads as that
    parameter's name from Python and as its flag from the CLI (:meth:`render`).
    """

    option: str | None = None

    def __init__(self, message: str, hint: str | None = None, *, option: str | None = None):
        if type(self) is RepconvError:
            raise TypeError("raise a subclass of RepconvError (InputFileError, OptionError, ...), not the base")
        self.message = message.strip().rstrip(".")
        self.hint = hint.strip().rstrip(".") if hint else None
        self.option = option or self.option
        super().__init__(str(self))

    def __str__(self) -> str:
        return self.render(None)

    def render(self, flag: str | None) -> str:
        """The one-line message, naming the option as ``flag`` (the CLI's) or, without one, as the API does."""
        text = self.message + (f"; {self.hint}" if self.hint else "")
        if self.option:
            text = text.replace("{option}", flag or self.option)
        return " ".join(text.split()) + "."


class InputFileError(RepconvError):
    """A file that is missing, empty, truncated, of the wrong kind or unsafe to load."""


class ArchError(RepconvError):
    """An architecture name that resolves to nothing, or weights that do not fit it."""


class TraceError(RepconvError):
    """A model torch.fx cannot trace."""


class PlanError(RepconvError):
    """A plan that does not fit the model (a step naming no module, overlapping units, ...)."""


class NothingToReplace(PlanError):
    """The chosen method finds nothing to change in this model."""


class VerificationError(RepconvError):
    """A numerical check (fold parity, export parity, round trip) that failed."""


class DataError(RepconvError):
    """A data folder or dataset that cannot be used."""


class DependencyError(RepconvError):
    """An optional dependency or device (timm, TensorRT, a GPU) that is missing."""


class OutputError(RepconvError):
    """An output path that cannot be written."""


class OptionError(RepconvError):
    """An option value that does not parse or does not fit, wherever it is checked.

    ``option`` is the API's parameter name (``every``, ``pf_policy``); the message reads
    ``every=1 would ...`` from Python and ``--every 1 would ...`` from the CLI (:meth:`for_flag`).
    """

    def __init__(self, option: str, value: Any, problem: str, hint: str | None = None):
        self.value, self.problem = value, problem.strip().rstrip(".")
        super().__init__(problem, hint, option=option)

    def render(self, flag: str | None) -> str:
        """``option=VALUE problem`` from Python, ``--flag VALUE problem`` from the CLI."""
        if self.value is None:
            subject = flag or self.option
        elif flag:
            shown = " ".join(map(str, self.value)) if isinstance(self.value, (list, tuple)) else str(self.value)
            subject = f"{flag} {shown}"
        else:
            subject = f"{self.option}={self.value!r}"
        text = f"{subject} {self.problem}" + (f"; {self.hint}" if self.hint else "")
        return " ".join(text.split()) + "."

    def for_flag(self, flag: str) -> str:
        return self.render(flag)
