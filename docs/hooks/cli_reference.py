"""MkDocs hook: the command line's reference, generated from `pipeline.cli.main` at build time.

A page asks for a table with a marker on a line of its own:

    <!-- cli: commands -->          every command and group, with its one-line help
    <!-- cli: options build -->     one command's usage line and options (`device add` for a subcommand)
    <!-- cli: reference -->         a section per command: its help, usage line and options

Each row is what `--help` prints (click's own help record, defaults included), so the site cannot
say something the command line does not do.
"""
from __future__ import annotations

import html
import re

import click

MARKER = re.compile(r"^<!-- cli: (commands|reference|options ([a-z -]+?)) -->$", re.MULTILINE)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _text(text: str) -> str:
    """Help text for a table cell: `<model>` must read as text, not as an HTML tag."""
    return _cell(html.escape(text, quote=False))


def _walk(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        yield (*prefix, name), command
        if isinstance(command, click.Group):
            yield from _walk(command, (*prefix, name))


def find(path: str) -> click.Command:
    from pipeline.cli import main

    commands = dict(_walk(main))
    words = tuple(path.split())
    if words not in commands:
        raise ValueError(f"docs ask for options of `pipeline {path}`, which does not exist; "
                         f"commands: {', '.join(' '.join(w) for w in commands)}")
    return commands[words]


def commands_table() -> str:
    from pipeline.cli import main

    rows = ["| command | what it does |", "| --- | --- |"]
    for words, command in _walk(main):
        if command.hidden:
            continue
        with click.Context(command, info_name=" ".join(("pipeline", *words))) as ctx:
            usage = " ".join(command.collect_usage_pieces(ctx))
        rows.append(f"| `pipeline {' '.join(words)} {_cell(usage)}` | {_text(command.get_short_help_str(200))} |")
    return "\n".join(rows)


def options_table(path: str) -> str:
    command = find(path)
    with click.Context(command, info_name=f"pipeline {path}") as ctx:
        usage = " ".join(command.collect_usage_pieces(ctx))
        # --help is on every command and says nothing about this one.
        records = [r for p in command.get_params(ctx) if (r := p.get_help_record(ctx)) and r[0] != "--help"]
    rows = [f"`pipeline {path} {usage}`", "", "| option | meaning |", "| --- | --- |"]
    rows += [f"| `{_cell(opts)}` | {_text(help_text)} |" for opts, help_text in records]
    return "\n".join(rows)


def reference() -> str:
    """Every command that takes options, in the order `pipeline --help` lists them, a new one included."""
    from pipeline.cli import main

    sections = []
    for words, command in _walk(main):
        if command.hidden or isinstance(command, click.Group):
            continue
        path, help_text = " ".join(words), html.escape(command.help or "", quote=False)
        sections.append(f"## pipeline {path}\n\n{help_text}\n\n{options_table(path)}")
    return "\n\n".join(sections)


def on_page_markdown(markdown: str, **_) -> str:
    def table(m: re.Match) -> str:
        if m.group(1) == "commands":
            return commands_table()
        return reference() if m.group(1) == "reference" else options_table(m.group(2))

    return MARKER.sub(table, markdown)
