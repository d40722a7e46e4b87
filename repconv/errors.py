"""Errors a user can act on.

Every failure caused by the user's input is a :class:`RepconvError` subclass. Its message is one line that
says what is wrong and how to fix it; the CLI prints it and exits with code 2 (``--debug`` adds the
traceback). API messages never name a command-line flag: :class:`OptionError` carries the parameter's
name and value, and the CLI shows them as the flag the user typed.
"""

from __future__ import annotations

from typing import Any


class RepconvError(Exception):
    """A problem with the user's input or environment, reported as one line. Raise a subclass."""

    def __init__(self, message: str, hint: str | None = None):
        if type(self) is RepconvError:
            raise TypeError("raise a subclass of RepconvError (InputFileError, OptionError, ...), not the base")
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
        self.option, self.value, self.problem = option, value, problem
        super().__init__(f"{self._subject(f'{option}=', repr)} {problem}", hint)

    def _subject(self, name: str, show) -> str:
        if self.value is None:
            return name.rstrip("=")
        value = " ".join(map(str, self.value)) if isinstance(self.value, (list, tuple)) and show is str \
            else show(self.value)
        return f"{name}{value}"

    def for_flag(self, flag: str) -> str:
        """The message with ``--flag VALUE`` in place of ``option=VALUE``."""
        text = f"{self._subject(f'{flag} ', str)} {self.problem.strip().rstrip('.')}"
        if self.hint:
            text += f"; {self.hint}"
        return " ".join(text.split()) + "."
