"""The report section of the replay audit: its HTML and its two figures (flip rate by layer;
flip risk against the router's margin), read from the run folder."""

from __future__ import annotations

import os

import numpy as np

from routelens.report.build import figures_html, provenance
from routelens.report.figures import ARM_COLOURS, Figure, interval_errors, subplots
from routelens.report.page import esc, interval, table
from routelens.results.stored import read_json_file


def section(run_dir: str, run: dict) -> str:
    from routelens.analyses.replay.table import (
        BIN_COLUMNS,
        COST_COLUMNS,
        CURVE_COLUMNS,
        LAYER_COLUMNS,
        bin_rows,
        cost_rows,
        curve_rows,
        layer_rows,
        notes,
    )

    summary = read_json_file(os.path.join(run_dir, "summary.json"))
    definitions = summary["definitions"]
    return (f"<h2>Routing replay: {esc(run_dir)}</h2>"
            f"<p>The routes of {esc(summary['route_source']['source'])} against the model's own, token by token and "
            f"layer by layer, and the model run with them forced at every layer at once. "
            f"Intervals: {esc(definitions['flip_rate'].split('; ', 1)[1])}.</p>"
            f"{table(LAYER_COLUMNS, layer_rows(summary, interval), 'replay-layers')}"
            f"<p>Flip risk by the router's margin: {esc(definitions['margin_curve'])}</p>"
            f"{table(CURVE_COLUMNS, curve_rows(summary, interval), 'replay-margin')}"
            f"{table(BIN_COLUMNS, bin_rows(summary, interval), 'replay-bins')}"
            f"<p>Cost: {esc(definitions['logprob_diff'])}; {esc(definitions['kl'])}. {esc(definitions['groups'])}.</p>"
            f"{table(COST_COLUMNS, cost_rows(summary, interval), 'replay-cost')}"
            f"<ul>{''.join(f'<li>{esc(line)}</li>' for line in notes(summary))}</ul>"
            f"{figures_html(run_dir, replay_figures(summary))}{provenance(run)}")


def replay_figures(summary: dict) -> list[Figure]:
    """Flip rate by MoE layer, and the flip-risk curve: flip rate by quantile bin of the margin."""
    unit = summary["cluster_unit"]
    fig, ax = subplots(1, 1, figsize=(5.5, 3.8))
    layers = list(summary["per_layer"])
    values = [summary["per_layer"][layer]["flip_rate"] for layer in layers]
    ax.bar(range(len(layers)), [np.nan if v is None else v for v in values], color=ARM_COLOURS[0], capsize=3,
           yerr=interval_errors(values, [summary["per_layer"][layer]["flip_rate_ci"] for layer in layers]))
    ax.set_xticks(range(len(layers)), layers)
    ax.set(xlabel="MoE layer", ylabel="flip rate [share of decisions]",
           title=f"Flip rate by layer: {summary['route_source']['source']}")
    fig.tight_layout()
    by_layer = Figure("replay_flip_rate_by_layer", "Flip rate by layer",
                      f"Share of scored tokens whose expert set differs from the natural run's, per MoE layer; error "
                      f"bars: 95% cluster bootstrap over {unit}.", fig)
    fig, ax = subplots(1, 1, figsize=(5.5, 3.8))
    curve = [c for c in summary["margin_curve"] if c["decisions"]]
    x = [c["margin_median"] for c in curve]
    rates = [c["flip_rate"] for c in curve]
    ax.errorbar(x, rates, yerr=interval_errors(rates, [c["flip_rate_ci"] for c in curve]), marker="o", capsize=3,
                color=ARM_COLOURS[1])
    if x and min(x) > 0:
        ax.set_xscale("log")
    ax.set(xlabel="router margin: k-th - (k+1)-th selection score (bin median)", ylabel="flip rate [share]",
           title=f"Flip risk vs margin ({summary['margin_curve_verdict']})")
    fig.tight_layout()
    by_margin = Figure("replay_flip_risk_vs_margin", "Flip risk vs margin",
                       f"Flip rate per quantile bin of the natural run's margin; error bars: 95% cluster bootstrap over "
                       f"{unit}. Verdict: {summary['margin_curve_verdict']}.", fig)
    return [by_layer, by_margin]
