"""The typer app, its commands, and the one place errors become exit codes.

Results go to stdout (a table, or one JSON object with ``--json``); progress and notes to stderr. A
:class:`~repconv.errors.RepconvError` or a usage error prints one line and exits 2; ``--debug`` anywhere on
the command line adds the traceback. Any other exception is an internal error (exit 1).
"""

from __future__ import annotations

import sys
import traceback

import typer
from rich.markup import escape

from repconv._version import __version__
from repconv.cli import convert, deploy, recover, report, run, search
from repconv.cli.render import err
from repconv.errors import RepconvError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Replacement Learning and parameter-free layers for "
                  "pretrained PyTorch vision models: convert, recover, fold, export, run.")

for command in (convert.inspect, convert.convert, convert.models, recover.calibrate, recover.finetune,
                recover.train, search.search, deploy.fold, deploy.export, run.predict, run.validate, run.bench,
                report.report, report.demo):
    app.command()(command)


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"repconv {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """Replacement Learning and parameter-free layers for pretrained PyTorch vision models."""


def flag_for(args: list[str], option: str) -> str | None:
    """The command-line flag of the API parameter ``option`` in the command ``args`` names, if it has one."""
    group = typer.main.get_command(app)
    name = next((a for a in args if a in getattr(group, "commands", {})), None)
    if name is None:
        return None
    for param in group.commands[name].params:
        if param.name == option and param.opts:
            return max(param.opts, key=len)
    return None


def _one_line(message: str) -> None:
    err.print(f"[red]error:[/] {escape(message)}", soft_wrap=True)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        app(args=args, prog_name="repconv", standalone_mode=False)
    except RepconvError as exc:
        if debug:
            traceback.print_exc()
        _one_line(exc.render(flag_for(args, exc.option) if exc.option else None))
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except typer.TyperException as exc:  # usage errors: unknown option, bad value (typer's vendored click)
        if debug:
            traceback.print_exc()
        command = f" {exc.ctx.command_path}" if getattr(exc, "ctx", None) else ""
        message = exc.format_message().replace("Value error, ", "")
        _one_line(f"{message} (see repconv{command.removeprefix(' repconv')} --help)")
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as exc:
        if debug:
            traceback.print_exc()
        else:
            err.print(f"[red]internal error:[/] {escape(f'{type(exc).__name__}: {exc}')} (run with --debug for the "
                      "traceback)", soft_wrap=True)
        sys.exit(1)
