"""Write the generated parts of docs/families.md: the count of served types, the table of
served families from the registry (so the page shows the gating rules the adapters compute)
and the table of refused types with the reason loading gives, each between its
`<!-- name:begin -->` and `<!-- name:end -->` markers; `--check` only says whether the page
is up to date (tests/models/test_registry.py runs the same check in the quick tier).

    .venv/bin/python scripts/families_doc.py           # rewrite the table
    .venv/bin/python scripts/families_doc.py --check   # exit 1 if docs/families.md is out of date
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from routelens.models.families import refusals  # noqa: E402
from routelens.models.registry import FAMILIES, markdown_table  # noqa: E402

PAGE = Path(__file__).resolve().parent.parent / "docs" / "families.md"


def count_line() -> str:
    hybrids = sum(entry.mixers != "attention" for entry in FAMILIES.values())
    return (f"{len(FAMILIES)} model types are served (`routelens models`), {hybrids} of them with token mixers "
            f"besides softmax attention (recurrent, linear or indexed layers: the cache engine scores the MoE layers "
            f"below one); {len(refusals.REFUSED)} are refused in one line each (below).\n")


PARTS = {"count": count_line, "families": markdown_table, "refusals": refusals.markdown_table}


def with_table(page: str) -> str:
    """`page` with the text between each pair of markers replaced by what generates it."""
    for name, generate in PARTS.items():
        begin, end = f"<!-- {name}:begin -->\n", f"<!-- {name}:end -->\n"
        start, stop = page.index(begin) + len(begin), page.index(end)
        page = page[:start] + generate() + page[stop:]
    return page


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
