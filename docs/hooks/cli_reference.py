"""MkDocs hook: the command-line reference is generated from the parser at build time, so
it can never disagree with `routelens COMMAND --help`."""

from __future__ import annotations

import os

MARKER = "<!-- cli-reference -->"


def _reference() -> str:
    os.environ["COLUMNS"] = "100"   # argparse wraps help to the terminal width: fix it
    from routelens.cli import build_parser, commands

    parser = build_parser()
    sections = ["## routelens\n\n```text\n" + parser.format_help() + "```\n"]
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in commands():
        sections.append(f"## routelens {name}\n\n```text\n{subparsers.choices[name].format_help()}```\n")
    return "\n".join(sections)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, _reference())
    return markdown
