"""The README's test command is what CI runs, verbatim."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)


def test_ci_runs_the_readme_test_command_verbatim():
    commands = readme_commands()
    test_command = commands[1]  # Set up: the main job first, then the tests
    assert test_command.endswith("pytest -q"), test_command
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


DOCS = ("README.md", "docs/design.md", "docs/multihost.md")
# Where a path the docs give relative to a package is looked up.
PACKAGES = ("", "pallas_kernels", "sparseinfer_jax", "sparseinfer_jax/bench")


def doc_paths() -> list[tuple[str, str]]:
    """Every `path/to/file.py` (or .md, .sh, .txtpb) the docs write in backticks."""
    found = []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        found += [(doc, p) for p in re.findall(r"`([\w./-]+/[\w.-]+\.(?:py|md|sh|txtpb))`", text)]
    return found


def test_the_files_the_docs_name_exist():
    missing = [(doc, path) for doc, path in doc_paths()
               if not any((ROOT / pkg / path).exists() for pkg in PACKAGES)]
    assert doc_paths() and not missing, missing


def test_the_backends_the_design_lists_are_the_code_s():
    from pallas_kernels.backend import BACKENDS

    text = (ROOT / "docs" / "design.md").read_text()
    listed = re.search(r"`backend` is one of ((?:`\w+`(?:, )?)+)", text)
    assert listed, "design.md no longer lists the backends"
    assert tuple(re.findall(r"`(\w+)`", listed.group(1))) == BACKENDS


def readme_cli_lines() -> list[list[str]]:
    """The README's `sparseinfer ...` and `sparseinfer-convert ...` command lines, split as a
    shell would (continuations joined, comments and the leading `&& `-joined install dropped)."""
    import shlex

    lines = []
    for block in readme_commands():
        for command in block.replace("\\\n", " ").splitlines():
            for part in command.split("&&"):
                words = shlex.split(part, comments=True)
                while words and "=" in words[0] and not words[0].startswith("-"):
                    words = words[1:]  # VAR=value before the command
                if words and words[0] in ("sparseinfer", "sparseinfer-convert"):
                    lines.append(words)
    return lines


def test_the_readme_command_lines_parse():
    from convert.cli import build_parser as convert_parser
    from sparseinfer_jax.cli.main import build_parser

    lines = readme_cli_lines()
    assert len(lines) >= 8, lines
    for words in lines:
        parser = build_parser() if words[0] == "sparseinfer" else convert_parser()
        parser.parse_args(words[1:])  # exits (SystemExit) on a flag the CLI does not take
