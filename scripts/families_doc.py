"""Write the table of served families in docs/families.md from the registry (between the
`<!-- families:begin -->` and `<!-- families:end -->` markers), so the page shows the
gating rules the adapters compute; `--check` only says whether the page is up to date
(tests/models/test_registry.py runs the same check in the quick tier).

    .venv/bin/python scripts/families_doc.py           # rewrite the table
    .venv/bin/python scripts/families_doc.py --check   # exit 1 if docs/families.md is out of date
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from routelens.models.registry import markdown_table  # noqa: E402

PAGE = Path(__file__).resolve().parent.parent / "docs" / "families.md"
BEGIN, END = "<!-- families:begin -->\n", "<!-- families:end -->\n"


def with_table(page: str) -> str:
    """`page` with the text between its markers replaced by the registry's table."""
    start, stop = page.index(BEGIN) + len(BEGIN), page.index(END)
    return page[:start] + markdown_table() + page[stop:]


def main(argv: list[str]) -> int:
    page = PAGE.read_text()
    if argv == ["--check"]:
        if with_table(page) != page:
            print(f"{PAGE} is out of date: run scripts/families_doc.py", file=sys.stderr)
            return 1
        return 0
    if argv:
        print(__doc__, file=sys.stderr)
        return 2
    PAGE.write_text(with_table(page))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
