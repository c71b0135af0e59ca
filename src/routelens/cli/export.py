"""`routelens export`: a run's summary table as CSV, LaTeX or Markdown (for papers)."""

from __future__ import annotations

NAME = "export"
HELP = "a run's summary table as CSV, LaTeX or Markdown"
RESUMABLE = False
EPILOG = """examples:
  routelens export runs/demo/counterfactual --format latex > table.tex
  routelens export runs/isolation --format markdown
  routelens export runs/passk --format csv --out passk.csv

The table is the run's `summary` DataFrame in Python (routelens.read_run(RUN).summary):
counterfactual: one row per layer and bin; isolation: per domain and layer; passk: per arm
and k; router-update: one row; rollout: per bin; replay: per MoE layer and all; semantic-routing: per layer set, domain and
arm; graft-evaluation: per domain, measure and slot. `--table joint` exports a
--joint-layers run's comparison of joint and single-layer gains instead (result.joint_summary).
Numbers are rounded to --digits for LaTeX and Markdown.
"""

FORMATS = ("csv", "latex", "markdown")


def digits(text: str) -> int:
    """Decimals shown: 0..15 (a float64 holds about 15 significant digits)."""
    from routelens.cli.parsing import bounded_int

    return bounded_int(text, 0, 15, "decimals, an integer in 0..15")


def parents():
    return []


def add_arguments(parser) -> None:
    parser.add_argument("run", metavar="RUN_DIR", help="a complete run folder")
    parser.add_argument("--format", choices=FORMATS, default="markdown", help="output format (default markdown)")
    parser.add_argument("--table", choices=("summary", "joint"), default="summary",
                        help="summary (default), or joint: a --joint-layers counterfactual run's joint comparison")
    parser.add_argument("--digits", type=digits, default=4, help="decimals in LaTeX and Markdown, 0..15 (default 4)")
    parser.add_argument("--out", default=None, help="write to this file (default: print)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if routelens wrote it (a file it did not write is never replaced)")


def render(frame, fmt: str, digits: int, caption: str) -> str:
    """The table in `fmt`: CSV at full precision, LaTeX (booktabs) and Markdown rounded."""
    if fmt == "csv":
        return frame.to_csv(index=False)
    rounded = frame.round(digits)
    if fmt == "latex":   # escaped: column names such as gain_ci_low must compile
        caption = "".join("\\" + c if c in "_%&#$" else c for c in caption)
        return rounded.to_latex(index=False, na_rep="--", caption=caption, float_format=f"%.{digits}f", escape=True)
    return rounded.to_markdown(index=False, floatfmt=f".{digits}f") + "\n"


def run(args) -> int:
    from routelens.results.objects import read_run
    from routelens.results.paths import check_out_file, write_output

    if args.out:
        check_out_file(args.out, inputs=[args.run], overwrite=args.overwrite)
    from routelens.errors import RouteLensError

    result = read_run(args.run)
    frame = result.summary
    if args.table == "joint":
        frame = getattr(result, "joint_summary", None)
        if frame is None:
            raise RouteLensError(f"{args.run} is not a --joint-layers counterfactual run; --table joint needs one")
    caption = f"routelens {result.kind} {args.table} of {result.config.get('model')}"
    text = render(frame, args.format, args.digits, caption)
    if args.out:
        write_output(args.out, text, "export")
        print(f"{result.kind} {args.table} ({len(frame)} rows) written to {args.out}")
    else:
        print(text, end="")
    return 0
