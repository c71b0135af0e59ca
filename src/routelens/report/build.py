"""`routelens report`: run folders -> figures (PNG and SVG in RUN_DIR/figures/) and one
self-contained HTML page. Everything shown is read from the run folders' own Parquet
tables, summary.json and run.json; nothing is recomputed but the figures."""

from __future__ import annotations

import importlib
import os

from routelens.errors import RouteLensError
from routelens.report.page import document, figure_html, key_values
from routelens.report.rendering import render_figures, workers
from routelens.results.paths import check_out_file, write_bytes_atomic, write_output
from routelens.results.run_folder import claim_in_run, write_text_atomic
from routelens.results.stored import REBUILD, StoredRun

KINDS = ("counterfactual", "rollout", "replay", "isolation", "semantic-routing", "graft-evaluation", "passk", "router-update")
# what each kind's section reads: all checked before any work
NEEDS = {"counterfactual": ("tokens.parquet", "routes.parquet", "summary.json"),
         "isolation": ("cells.parquet", "calibration.parquet", "summary.json"),
         "passk": ("summary.json",),
         "router-update": ("summary.json", "training_log.jsonl"),
         "rollout": ("rollouts.parquet", "summary.json"),
         "replay": ("summary.json",),
         "graft-evaluation": ("items.parquet", "summary.json"),
         "semantic-routing": ("scores.parquet", "classification.parquet", "summary.json")}


def _run(run_dir: str) -> dict:
    """run.json of a complete run of a kind the report shows, every file its section reads
    checked there and readable (`StoredRun`)."""
    stored = StoredRun(run_dir, needed_by="the report")
    if stored.kind not in KINDS:
        raise RouteLensError(f"{run_dir} holds a {stored.kind!r} run; reports are made of {', '.join(KINDS)} runs")
    missing = [name for name in NEEDS[stored.kind] if not os.path.isfile(stored.file(name))]
    if missing:
        raise RouteLensError(f"{run_dir} is a complete {stored.kind} run but lacks {', '.join(missing)}; {REBUILD}")
    stored.require(*NEEDS[stored.kind])
    return stored.state


def p_at_floor(p_value: float, n: int) -> str:
    """The p-value, marked where it sits at the exact signed-rank test's smallest value for n."""
    floor = 2 * 0.5 ** int(n)
    return f"{p_value:.2e}" + (" (floor)" if n <= 50 and abs(p_value - floor) <= floor * 1e-6 else "")


def figures_html(run_dir: str, figures: list) -> str:
    """The figures as HTML, also written to RUN_DIR/figures/ (PNG and SVG, listed in the run's run.json)."""
    names = [[os.path.join("figures", figure.name + suffix) for suffix in (".png", ".svg")] for figure in figures]
    claim_in_run(run_dir, [name for pair in names for name in pair])   # a refused name refuses before any drawing
    parts = []
    for figure, (png, svg), (png_bytes, svg_text) in zip(figures, names, render_figures(figures)):
        write_bytes_atomic(os.path.join(run_dir, png), png_bytes)
        write_text_atomic(os.path.join(run_dir, svg), svg_text)
        parts.append(figure_html(figure, png_bytes))
    return "\n".join(parts)


def provenance(run: dict) -> str:
    return ("<details><summary>Config and provenance (run.json)</summary>" + key_values(run["config"])
            + key_values({k: v for k, v in run.items() if k not in ("config",)}) + "</details>")


# ---------------------------------------------------------------------------- token text
def tokenizer_of(spec: str):
    from routelens.models.loading import load_tokenizer

    try:
        return load_tokenizer(spec, local_files_only=True)
    except Exception:  # no usable local tokenizer: the table shows token ids instead
        return None


# kind -> the analysis folder whose report.py has its `section(run_dir, run)` (imported when needed)
SECTIONS = {"counterfactual": "counterfactual", "rollout": "rollout", "replay": "replay", "isolation": "isolation",
            "semantic-routing": "semantic_routing", "graft-evaluation": "graft", "passk": "passk",
            "router-update": "router_update"}


def section(kind: str, run_dir: str, run: dict) -> str:
    """The report section of one run, written by its analysis (`analyses/<name>/report.py`)."""
    return importlib.import_module(f"routelens.analyses.{SECTIONS[kind]}.report").section(run_dir, run)


def build_report(run_dirs: list[str], out: str | None = None, overwrite: bool = False) -> str:
    """Write the report of one or several run folders; returns the HTML file's path.

    Without `out`, one folder's report is RUN_DIR/report.html, part of the run (listed in its
    run.json and rebuilt by every report); several folders' is routelens-report.html here.
    A file `out` that exists is replaced only with `overwrite`, and only when routelens
    wrote it (`results.paths.check_out_file`)."""
    from routelens import validate

    out = validate.path(out, "out", optional=True)
    seen = {}
    for run_dir in run_dirs:
        if os.path.realpath(run_dir) in seen:
            raise RouteLensError(f"{run_dir} is named twice (also as {seen[os.path.realpath(run_dir)]}); "
                                 "give each run folder once")
        seen[os.path.realpath(run_dir)] = run_dir
    runs = [(run_dir, _run(run_dir)) for run_dir in run_dirs]   # every folder checked before any work
    workers(2)   # and ROUTELENS_REPORT_WORKERS
    in_run = out is None and len(run_dirs) == 1
    if in_run:
        out = os.path.join(run_dirs[0], "report.html")
        claim_in_run(run_dirs[0], ["report.html"])
    else:
        out = out or "routelens-report.html"
        check_out_file(out, inputs=run_dirs, overwrite=overwrite)
    body = "\n".join(section(run["kind"], run_dir, run) for run_dir, run in runs)
    kinds = ", ".join(dict.fromkeys(run["kind"] for _, run in runs))
    html = document(f"routelens report: {kinds}", body)
    if in_run:
        write_text_atomic(out, html)
    else:
        write_output(out, html, "report")
    return out
