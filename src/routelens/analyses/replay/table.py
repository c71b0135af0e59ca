"""The tables `routelens replay` prints, read from its summary.json. The rows are built here
once and shared with the report section (`report.py`)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from routelens.config import ALL_TOKENS, BINS
from routelens.report.formats import with_interval

LAYER_COLUMNS = ["layer", "decisions", "flips", "flip rate", "Jaccard"]
CURVE_COLUMNS = ["margin bin", "margin range", "decisions", "flips", "flip rate", "share of flips"]
BIN_COLUMNS = ["bin (natural p)", "decisions", "flips", "flip rate"]
COST_COLUMNS = ["tokens", "n", "log p replayed - natural", "|log p diff|", "KL(natural || replayed)", "argmax changed"]
COST_GROUPS = {ALL_TOKENS: "all", "flipped": "flipped here", "not_flipped": "not flipped here",
               "clean_prefix": "no flip at or before", **{f"bin:{name}": name for name in BINS}}


def layer_rows(summary: dict, interval=with_interval) -> list[list[str]]:
    rows = [[layer, str(at["decisions"]), str(at["flips"]), interval(at["flip_rate"], at["flip_rate_ci"]),
             interval(at["jaccard"], at["jaccard_ci"])] for layer, at in summary["per_layer"].items()]
    overall = summary["overall"]
    rows.append(["all", str(overall["decisions"]), str(overall["flips"]),
                 interval(overall["flip_rate"], overall["flip_rate_ci"]), interval(overall["jaccard"], [None, None])])
    return rows


def curve_rows(summary: dict, interval=with_interval) -> list[list[str]]:
    return [[str(c["bin"]), f"{c['margin_low']:.2e} .. {c['margin_high']:.2e}", str(c["decisions"]), str(c["flips"]),
             interval(c["flip_rate"], c["flip_rate_ci"]), f"{c['share_of_flips']:.2f}"] for c in summary["margin_curve"]]


def bin_rows(summary: dict, interval=with_interval) -> list[list[str]]:
    return [[name, str(at["decisions"]), str(at["flips"]), interval(at["flip_rate"], at["flip_rate_ci"])]
            for name, at in summary["by_bin"].items()]


def cost_rows(summary: dict, interval=with_interval) -> list[list[str]]:
    rows = []
    for key, label in COST_GROUPS.items():
        at = summary["consequence"].get(key, {"tokens": 0})
        if not at["tokens"]:
            rows.append([label, "0", "-", "-", "-", "-"])
            continue
        rows.append([label, str(at["tokens"]), interval(at["logprob_diff"], at["logprob_diff_ci"], 4),
                     interval(at["abs_logprob_diff"], at["abs_logprob_diff_ci"], 4), interval(at["kl"], at["kl_ci"], 5),
                     interval(at["argmax_changed"], at["argmax_changed_ci"])])
    return rows


def notes(summary: dict) -> list[str]:
    overall = summary["overall"]
    source = summary["route_source"]
    lines = [f"routes: {source['source']} against the model's own (natural) routes; {summary['trajectories']} "
             f"trajectories, intervals resample {summary['cluster_unit']}"
             + (" (fewer than 10: intervals unreliable)" if summary["few_clusters"] else ""),
             f"tokens with a flip at some layer: {overall['tokens_with_a_flip']} of {overall['tokens']} "
             f"({with_interval(overall['tokens_with_a_flip_share'], overall['tokens_with_a_flip_ci'])}); layers flipped "
             f"per token: {with_interval(overall['layers_flipped_mean'], overall['layers_flipped_ci'])}",
             f"flip risk vs margin: {summary['margin_curve_verdict']}; median margin of flipped decisions "
             f"{_num(summary['flipped_margin_median'])}, of the others {_num(summary['unflipped_margin_median'])}"]
    if overall["unscored_decisions"]:
        lines.append(f"unscored positions (the prompt, the last token): flip rate {_num(overall['unscored_flip_rate'])} "
                     f"over {overall['unscored_decisions']} decisions (not in the tables above)")
    if gap := (summary.get("engine_logprobs") or {}).get(ALL_TOKENS):
        closed = gap["share_of_gap_closed_by_replay"]
        lines.append(f"the engine's own log p of the next token against the model's: |engine - natural| "
                     f"{with_interval(gap['abs_engine_minus_natural'], gap['abs_engine_minus_natural_ci'])}, "
                     f"|engine - replayed| {with_interval(gap['abs_engine_minus_replayed'], gap['abs_engine_minus_replayed_ci'])}"
                     f" nats over {gap['tokens']} tokens"
                     + ("" if closed is None else f"; replaying its routes closes {closed:.0%} of the gap"))
    if summary.get("trajectories_without_routes"):
        lines.append(f"{summary['trajectories_without_routes']} trajectories have no routes in the source: not audited")
    return lines


def _num(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def _rich(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def print_replay_summary(summary: dict, console: Console | None = None) -> None:
    console = console or Console(width=160)
    unit = summary["cluster_unit"]
    console.print(_rich(f"routing replay: {summary['route_source']['source']} vs natural routes, flips per MoE layer "
                        f"(scored tokens; 95% cluster bootstrap over {unit})", LAYER_COLUMNS, layer_rows(summary)))
    console.print(_rich("flip risk by the router's margin (k-th minus (k+1)-th selection score, quantile bins)",
                        CURVE_COLUMNS, curve_rows(summary)))
    console.print(_rich("flip rate by the natural run's bin (p of the next token)", BIN_COLUMNS, bin_rows(summary)))
    console.print(_rich("cost: the engine's routes forced at every layer at once against natural routes, per scored "
                        "token (nats)", COST_COLUMNS, cost_rows(summary)))
    for line in notes(summary):
        console.print(line)
