"""The README and the docs site: every `pipeline ...` command they quote exists, the option tables come
from the click definitions, and `mkdocs build --strict` fails on what a reader would trip over."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from pipeline.cli import main

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*```")
INLINE = re.compile(r"`(pipeline(?: [^`]*)?)`")


def quoted_commands(path: Path) -> list[tuple[int, str]]:
    """(line number, command) for each `pipeline ...` in a code block line or an inline code span."""
    found, in_block, pending = [], False, None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line):
            in_block = not in_block
            continue
        if in_block:
            text = line.split(" #")[0].strip()  # a trailing shell comment is not part of the command
            if pending is not None:
                pending = (pending[0], pending[1] + " " + text.rstrip("\\").strip())
            elif text.startswith("pipeline ") or text == "pipeline":
                pending = (number, text.rstrip("\\").strip())
            if pending is not None and not text.endswith("\\"):
                found.append(pending)
                pending = None
        else:
            found += [(number, m.group(1).replace("\\|", "|")) for m in INLINE.finditer(line)]
    return found


def problem(command: str) -> str | None:
    """Why `command` is not one the command line accepts (None: every subcommand and option exists).
    Placeholders (RUN_DIR, [--flag], A|B, ...) are read as the docs write them."""
    cmd, words = main, command.split()[1:]
    for word in words:
        for token in word.strip("[]").split("|"):
            token = token.strip("[]")
            if token == "...":
                if isinstance(cmd, click.Group):
                    return None  # `pipeline ...`: any command
                continue
            if token.startswith("-") and token != "-":
                name = token.split("=")[0]
                with click.Context(cmd) as ctx:
                    known = {o for p in cmd.get_params(ctx) for o in (*p.opts, *p.secondary_opts)}
                if name not in known:
                    return f"`{name}` is not an option of `pipeline {cmd_path(cmd)}`"
            elif isinstance(cmd, click.Group) and token:
                if token not in cmd.commands:
                    return f"`{token}` is not a command of `pipeline{' ' + cmd_path(cmd) if cmd is not main else ''}`"
                cmd = cmd.commands[token]
    return None


def cmd_path(cmd: click.Command) -> str:
    def walk(group, prefix):
        for name, sub in group.commands.items():
            if sub is cmd:
                return prefix + name
            if isinstance(sub, click.Group) and (inner := walk(sub, prefix + name + " ")):
                return inner
        return None

    return walk(main, "") or cmd.name


def test_every_command_the_readme_and_docs_quote_exists():
    quoted = [(page, number, command) for page in PAGES for number, command in quoted_commands(page)]
    assert len(quoted) > 40, "the collector found too few commands to be working"
    assert {c.split()[1] for _, _, c in quoted if len(c.split()) > 1} >= {"build", "bundle", "deploy", "export"}
    wrong = [f"{page.relative_to(REPO)}:{number}: {command}: {why}"
             for page, number, command in quoted if (why := problem(command))]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("command", ["pipeline build --no-such-option 3", "pipeline bild --quantize int8",
                                     "pipeline device ad pi4 pi@host", "pipeline deploy RUN [--no-device X]",
                                     "pipeline export RUN --target tflm --board nano33ble --flashy 1"])
def test_the_check_catches_a_command_that_does_not_exist(command):
    assert problem(command)


def test_the_collector_reads_blocks_continuations_and_inline_spans(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Run `pipeline bundle RUN_DIR [--out FILE]` or `pipeline verify RUN_DIR\\|BUNDLE`.\n"
                    "```\npipeline build --data-dir D \\\n    --max-accuracy-drop 1   # comment\npython x.py\n```\n")
    assert quoted_commands(page) == [(1, "pipeline bundle RUN_DIR [--out FILE]"), (1, "pipeline verify RUN_DIR|BUNDLE"),
                                     (3, "pipeline build --data-dir D --max-accuracy-drop 1")]


def _hook():
    sys.path.insert(0, str(REPO / "docs" / "hooks"))
    try:
        import cli_reference
    finally:
        sys.path.pop(0)
    return cli_reference


def test_the_option_tables_are_what_help_prints():
    """Every option --help shows, for every command, is a row of the generated reference."""
    reference = _hook().reference()
    runner = CliRunner()
    commands = [("build",), ("deploy",), ("export",), ("device", "remove"), ("compare",), ("bundle",)]
    for words in commands:
        result = runner.invoke(main, [*words, "--help"])
        assert result.exit_code == 0
        cmd = main
        for w in words:
            cmd = cmd.commands[w]
        with click.Context(cmd) as ctx:
            for param in cmd.get_params(ctx):
                if isinstance(param, click.Option) and "--help" not in param.opts:
                    opts, help_text = param.get_help_record(ctx)
                    assert opts.split()[0] in result.output
                    assert f"| `{opts.replace('|', chr(92) + '|')}` |" in reference, (words, opts)


def _mkdocs(config_dir: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=config_dir, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    proc = _mkdocs(REPO, site)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return site


def test_the_site_builds_strict_with_the_generated_reference(built_site):
    cli = (built_site / "cli" / "index.html").read_text()
    for option in ("--max-accuracy-drop", "--accept-new-host-key", "--flash", "--wheels", "--device-results"):
        assert option in cli
    assert "&lt;!-- cli:" not in cli and "<!-- cli:" not in cli  # every marker was replaced


@pytest.mark.parametrize("damage", ["orphan page", "broken link", "missing anchor"])
def test_strict_build_fails_on_what_a_reader_would_trip_over(tmp_path, damage):
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    shutil.copy(REPO / "mkdocs.yml", tmp_path)
    if damage == "orphan page":
        (tmp_path / "docs" / "left-out.md").write_text("# Not in the nav\n")
    else:
        target = "nowhere.md" if damage == "broken link" else "data.md#no-such-section"
        with open(tmp_path / "docs" / "exit-codes.md", "a") as f:
            f.write(f"\nSee [this]({target}).\n")
    proc = _mkdocs(tmp_path, tmp_path / "site")
    assert proc.returncode != 0, damage
    assert "left-out.md" in proc.stderr or "nowhere.md" in proc.stderr or "no-such-section" in proc.stderr


def test_the_readme_is_one_screen_with_the_set_up_ci_runs():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert len(readme.splitlines()) <= 150
    for command in ('pip install -e ".[dev]"', "python -m pytest"):
        assert command in ci and f"```\n{command}\n```" in readme
    assert "pipeline.metadata --install" not in "\n".join(ci)  # two commands are the whole set-up
    linked = set(re.findall(r"\]\(docs/([a-z-]+\.md)", readme))
    assert linked == {p.name for p in (REPO / "docs").glob("*.md")} - {"index.md"}  # every topic is reachable
