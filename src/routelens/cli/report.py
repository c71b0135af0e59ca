"""`routelens report`: figures and a self-contained HTML report of run folders."""

from __future__ import annotations

NAME = "report"
HELP = "figures and a self-contained HTML report of run folders"
RESUMABLE = False
INTERRUPTED = ("the report was not written (figures drawn so far are kept in the run folders' figures/, listed in "
               "their run.json); re-running starts again")
EPILOG = """examples:
  routelens report runs/demo/counterfactual
  routelens report runs/cf runs/isolation runs/passk --out report.html
"""


def parents():
    return []


def add_arguments(parser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="counterfactual, isolation, router-update or passk run folders")
    parser.add_argument("--out", default=None,
                        help="HTML file (default RUN_DIR/report.html for one folder, routelens-report.html for several)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if routelens wrote it (a file it did not write is never replaced)")


def run(args) -> int:
    from routelens.report.build import build_report
    path = build_report(args.runs, args.out, overwrite=args.overwrite)
    print(f"report: {path} (figures as PNG and SVG in each run folder's figures/)")
    return 0
