"""The ``repconv`` command (typer): it parses, calls :mod:`repconv.api` and renders; it holds no logic."""

from repconv.cli.app import app, main

__all__ = ["app", "main"]
