"""The report section of the rollouts: its HTML and its figures (read from the run folder)."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from routelens.report.build import figures_html, provenance
from routelens.report.figures import ARM_COLOURS, BIN_COLOURS, Figure, interval_errors, subplots
from routelens.report.page import esc, interval, table
from routelens.results.stored import read_json_file, read_table_file


def section(run_dir: str, run: dict) -> str:
    from routelens.analyses.rollout.analysis import per_token
    from routelens.analyses.rollout.table import FIRST_TOKEN_COLUMNS, MAIN_COLUMNS, first_token_rows, main_rows, notes

    summary = read_json_file(os.path.join(run_dir, "summary.json"))
    tokens = per_token(read_table_file(os.path.join(run_dir, "rollouts.parquet")))
    comparison = table(MAIN_COLUMNS, main_rows(summary, interval), "rollout-bins")
    rows = first_token_rows(summary, interval)
    decomposition = (f"<p>By the first emitted token: is it the trajectory's own next token (the proxy's target)?</p>"
                     f"{table(FIRST_TOKEN_COLUMNS, rows, 'rollout-first-token')}" if rows else "")
    selection = summary["selection"]
    return (f"<h2>Rollouts: {esc(run_dir)}</h2>"
            f"<p>Does the next-token proxy's better route also end in a better answer? {selection['chosen']} tokens of "
            f"{esc(run['config']['counterfactual'])} (--tokens {esc(selection['tokens'])}), each continued "
            f"{summary['samples_per_arm']} time(s) per arm at T={summary['temperature']}, the route forced at that token "
            f"and layer only; answers checked by {esc(summary['checker'])}. Sample s of every arm shares one random "
            f"stream, so arms are paired. Intervals: {esc(summary['interval'])}. <em>Proxy agrees</em>: among tokens "
            f"whose best-alternative and standard accuracies differ, the share where the best alternative wins.</p>"
            f"{comparison}{decomposition}<ul>{''.join(f'<li>{esc(line)}</li>' for line in notes(summary))}</ul>"
            f"{figures_html(run_dir, rollout_figures(tokens, summary))}{provenance(run)}")


def rollout_figures(per_token: pd.DataFrame, summary: dict) -> list[Figure]:
    """Accuracy of each arm by bin, and per token the outcome difference against the
    proxy's gain (does a larger next-token gain mean a better final answer?)."""
    from routelens.analyses.rollout.table import resampled

    arms = ("standard", "best_alt", "random_alt")
    bins = list(summary["bins"])
    fig, (ax_bars, ax_points) = subplots(1, 2, figsize=(11, 4.0))
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        values = [summary["bins"][b][f"accuracy_{arm}"] for b in bins]
        ax_bars.bar(np.arange(len(bins)) + (i - 1) * width, [np.nan if v is None else v for v in values], width,
                    color=ARM_COLOURS[i], label=arm.replace("_", " "), capsize=3,
                    yerr=interval_errors(values, [summary["bins"][b][f"accuracy_{arm}_ci"] for b in bins]))
    ax_bars.set_xticks(range(len(bins)), bins)
    ax_bars.set(xlabel="bin of the token (route-averaged p)", ylabel="final answers correct [share]",
                title="Accuracy of the continuations by arm", ylim=(0, 1.05))
    ax_bars.legend(fontsize=8)
    difference = per_token["accuracy_best_alt"] - per_token["accuracy_standard"]
    # the best alt's own proxy gain (runs before --best-by: the token's gain, the same route)
    gain = per_token["p_best_alt"] - per_token["p_standard"] if "p_best_alt" in per_token else per_token["gain"]
    for name, colour_of_bin in BIN_COLOURS.items():
        at = per_token["bin"] == name
        ax_points.scatter(gain[at], difference[at], s=12, alpha=0.7, color=colour_of_bin, label=name)
    ax_points.axhline(0, color="black", linewidth=0.8)
    ax_points.set(xlabel="proxy gain of the best alt: p(best alt) - p(standard) of the next token [probability]",
                  ylabel="accuracy best alt - standard [share]", title="Outcome against the proxy, per token")
    ax_points.legend(fontsize=8)
    fig.tight_layout()
    return [Figure("rollout_outcomes", "Rollout outcomes", f"Error bars: 95% bootstrap over {resampled(summary)}. Right: one "
                   "point per token; above 0 the best alternative's continuations end right more often than the "
                   "standard route's.", fig)]
