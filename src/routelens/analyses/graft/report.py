"""The report section of the graft evaluation: its HTML and its figures (read from the run folder)."""

from __future__ import annotations

import os

from routelens.report.build import provenance
from routelens.report.page import esc, interval, table
from routelens.results.run_folder import read_json


def section(run_dir: str, run: dict) -> str:
    summary = read_json(os.path.join(run_dir, "summary.json"))

    def cell(test: dict, digits: int = 3) -> str:
        return (f"{test['before']:.{digits}f} -> {test['after']:.{digits}f}: "
                f"{interval(test['difference'], test['ci'], digits)}, q {test['q_value']:.2g}")

    rows = []
    for domain, block in summary["domains"].items():
        for pair, tests in block["pairs"].items():
            rows.append([domain, block["natural"]["items"], cell(block["natural"]), pair, cell(tests["selection"], 2),
                         cell(tests["forced"])])
    comparison = table(["domain", "items", "natural score: recipient -> grafted", "slot (L:e=L2:e2)",
                        "selection share: before -> after", "slot forced alone: original -> grafted"], rows, "graft")
    return (f"<h2>Graft evaluation: {esc(run_dir)}</h2>"
            f"<p>{esc(run['config']['model'])} with donor experts grafted ({esc(', '.join(summary['pairs']))}), "
            f"paired per item: after - before with {esc(summary['interval'])}; scores are {esc(summary['score'])}.</p>"
            f"{comparison}{provenance(run)}")
