"""How a command runs and ends: its console session, the one mapping from what went wrong to the line
and the exit code, and the summary table it prints.

Exit codes (docs/exit-codes.md): 0 ok; 1 the command ran and failed (bad data or files, a check that
found problems); 2 the command line is wrong (unknown or conflicting options, a value out of range, a
path that does not exist or is of the wrong kind); 130 interrupted (Ctrl-C, see interrupts.py). User
mistakes are one line, never a traceback; tracebacks are for bugs only.
"""
from __future__ import annotations

import functools
from pathlib import Path

import click

from pipeline import interrupts
from pipeline.config import ConfigError


class UserError(click.ClickException):
    """A problem with the user's input or files; exit code 1, message only."""


def exit_error(error: BaseException, command: str) -> click.ClickException | None:
    """The one line and exit code a command ends with after `error`: 2 for a wrong command line, 130 for
    Ctrl-C, 1 for the user's input, the machine (a full disk) or a bug. None for a bug that ran outside a
    console session: its traceback is the message. Notes the build or the session added (`--resume`, where
    the log is) end the line."""
    from pipeline import failures

    notes = "".join(f"; {n}" for n in getattr(error, "__notes__", ()))
    what = failures.kind(error)
    if what == failures.INTERRUPTED:
        return interrupts.interrupted(command, notes)
    if isinstance(error, click.ClickException):
        return error
    if isinstance(error, ConfigError):
        return click.UsageError(str(error))
    if what == failures.INPUT:
        return UserError(f"{error}{notes}")
    if what == failures.MACHINE:
        return UserError(f"{failures.machine_problem(error)}{notes}")
    if notes:
        return UserError(f"failed: {type(error).__name__}: {error}{notes}")
    return None


def handle_errors(fn):
    """Every command: Ctrl-C remembered however it surfaces, every exception mapped by `exit_error`."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with interrupts.ctrl_c():
                return fn(*args, **kwargs)
        except (click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except BaseException as e:
            mapped = exit_error(e, fn.__name__)
            if mapped is None or mapped is e:
                raise
            raise mapped from e
    return wrapper


def captured(verbose: bool, work):
    """Run work(log) with TensorFlow's and LiteRT's own output kept in a log, off the terminal; a bug
    keeps the log and names it (console.session)."""
    from pipeline import console

    with console.session(verbose) as session:
        return work(session.say)


def warn_learning(run_dir: Path) -> None:
    """The report's notes that say the model did not learn, on the console too (they are in the report)."""
    from pipeline.report.render import learning_warnings

    for text in learning_warnings(run_dir):
        click.echo(f"warning: {text}", err=True)


def print_table(run_dir: Path) -> None:
    report_md = Path(run_dir) / "report.md"
    if report_md.exists():
        from pipeline.report.render import delivery_line, summary_table

        click.echo(summary_table(run_dir))
        click.echo(delivery_line(run_dir))
