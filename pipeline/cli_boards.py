"""The commands that reach boards over SSH: `pipeline device` (named boards) and `pipeline deploy`."""
from __future__ import annotations

import json
from pathlib import Path

import click

from pipeline.cli_options import Finite, ssh_options, ssh_settings
from pipeline.cli_run import UserError, handle_errors, print_table


@click.group("device")
def device_group():
    """Named boards for `pipeline deploy` ($XDG_CONFIG_HOME/edgepipe/devices.json); SSH keys stay in ~/.ssh."""


@device_group.command("add")
@click.argument("name")
@click.argument("target", metavar="[USER@]HOST[:PORT]")
@click.option("--replace", is_flag=True, help="Point an existing name at a new destination.")
@handle_errors
def device_add(name, target, replace):
    """Name a board; HOST may be an address, a host name or a Host alias of ~/.ssh/config."""
    from pipeline.boards import devices

    board = devices.add(name, target, replace)
    click.echo(f"{board.name}: {board.target} (in {devices.config_path()})")


@device_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the boards as JSON.")
@handle_errors
def device_list(as_json):
    """The named boards."""
    from pipeline.boards import devices

    boards = devices.load()
    if as_json:
        click.echo(json.dumps({n: {"target": d.target} for n, d in boards.items()}, indent=2))
    elif not boards:
        click.echo("no boards yet; add one with `pipeline device add NAME [USER@]HOST[:PORT]`")
    for name, board in sorted(boards.items()) if not as_json else ():
        click.echo(f"{name}  {board.target}")


@device_group.command("remove")
@click.argument("name")
@click.option("--purge", is_flag=True, help="First delete ~/edgepipe on the board over SSH: every run, environment "
                                            "and cache `pipeline deploy` put there, and nothing else.")
@ssh_options
@handle_errors
def device_remove(name, purge, **ssh):
    """Forget a named board (with --purge, after cleaning up after deploy on it)."""
    from pipeline.boards import devices
    from pipeline.boards.deploy import purge as purge_board
    from pipeline.boards.ssh import BoardError

    if name not in devices.load():
        raise UserError(f"no board named {name}; `pipeline device list` shows the known ones")
    if purge:
        try:
            removed = purge_board(name, ssh_settings(**ssh))
        except BoardError as e:
            raise UserError(f"{name}: {e}; the board stays in the list (remove it without --purge to forget it anyway)")
        click.echo(f"{name}: " + ("removed ~/edgepipe from the board" if removed else "nothing to remove on the board"))
    devices.remove(name)
    click.echo(f"{name}: forgotten")


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--device", "targets", multiple=True, required=True, metavar="NAME|[USER@]HOST[:PORT]",
              help="A board by name (`pipeline device list`) or SSH destination; "
                   "repeat for several, deployed in parallel.")
@click.option("--bundle", "bundle_path", type=click.Path(exists=True, dir_okay=False),
              help="Deploy this bundle of the run (e.g. made with `pipeline bundle --wheels`) "
                   "instead of making one.")
@click.option("--runs", type=click.IntRange(min=1), default=200, show_default=True,
              help="Timed inferences per model on the board.")
@click.option("--warmup", type=click.IntRange(min=0), default=20, show_default=True,
              help="Warm-up inferences before them.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="Interpreter threads on the board.")
@click.option("--timeout", type=Finite(min=1), default=900, show_default=True,
              help="Seconds a board may take, from connecting to its results.")
@click.option("--clean", is_flag=True, help="Delete the run's folder on each board first (~/edgepipe/RUN), so the "
                                            "bundle is copied and unpacked afresh; environments are kept.")
@ssh_options
@handle_errors
def deploy(run_dir, targets, bundle_path, runs, warmup, threads, timeout, clean, **ssh):
    """Put a run's models on boards over SSH, evaluate and benchmark them there, and add each board to the report."""
    from pipeline.boards import deploy as boards

    cfg = boards.DeployConfig(tuple(targets), bundle_path, runs, warmup, threads, timeout, clean, ssh_settings(**ssh))
    entries = boards.deploy(run_dir, cfg, log=lambda m: click.echo(m, err=True))
    for line in boards.summary(entries):
        click.echo(line)
    print_table(run_dir)
    failed = [e["name"] for e in entries if not e["ok"]]
    if len(failed) == len(entries):
        raise UserError(f"{len(failed)} of {len(entries)} board(s) failed: {', '.join(failed)} (reasons above); "
                        "nothing was merged, the run is unchanged")
    if failed:
        raise UserError(f"{len(failed)} of {len(entries)} board(s) failed: {', '.join(failed)} (reasons above and in "
                        f"the report); the others were merged")
