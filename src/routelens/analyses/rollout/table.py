"""The tables `routelens` prints at the end of the rollouts, read from its summary.json.
The rows and notes are built here once and shared with the report section (`report.py`).
Summaries of runs made before the first-token decomposition lack its fields: their
tables show the rest and say what is absent."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from routelens.report.formats import with_interval

ARM_LABELS = {"standard": "standard", "best_alt": "best alt", "random_alt": "random alt"}
MAIN_COLUMNS = ["bin", "units", "standard", "best alt", "random alt", "best - standard", "random - standard",
                "proxy agrees"]
FIRST_TOKEN_COLUMNS = ["bin", "arm", "first = traj.'s", "acc. | first = traj.'s", "acc. | first other",
                       "minus standard", "via first token", "beyond first token", "same first", "identical"]
ABSENT = ("first-token decomposition: not in this run's summary.json (a run made before it existed, which kept no "
          "first tokens); rerun the rollout to get it")


def groups(summary: dict) -> dict[str, dict]:
    """The summary's groups in print order: the bins, then (with tokens of wrong trajectories) each verdict."""
    return {**summary["bins"], **{f"{name} trajectories": g for name, g in summary.get("by_verdict", {}).items()}}


def resampled(summary: dict) -> str:
    """What the intervals resample (trajectories in runs before problem-level intervals)."""
    return summary.get("resampled", "trajectories")


def units_text(group: dict) -> str:
    """tokens / positions / problems (or trajectories where there are no problem ids; old runs: tokens only)."""
    if "positions" not in group:
        return str(group["tokens"])
    last = group["problems"] if group.get("problems") is not None else f"{group['trajectories']} traj."
    return f"{group['tokens']} / {group['positions']} / {last}"


def main_rows(summary: dict, interval=with_interval) -> list[list[str]]:
    """Per group: units, each arm's accuracy, the paired differences, how often the outcome follows the proxy."""
    rows = []
    for name, group in groups(summary).items():
        outcome = group["outcome"]
        agreement = outcome["proxy_agreement"]
        rows.append([name + ("*" if group["few_clusters"] else ""), units_text(group),
                     *[interval(group[f"accuracy_{arm}"], group[f"accuracy_{arm}_ci"]) for arm in ARM_LABELS],
                     interval(group["best_alt_minus_standard"], group["best_alt_minus_standard_ci"]),
                     interval(group["random_alt_minus_standard"], group["random_alt_minus_standard_ci"]),
                     "-" if agreement is None else
                     f"{agreement:.2f} ({outcome['best_alt_better']} of "
                     f"{outcome['best_alt_better'] + outcome['best_alt_worse']})"])
    return rows


def first_token_rows(summary: dict, interval=with_interval, compact: bool = False) -> list[list[str]]:
    """Per group and arm: the share of first tokens that are the trajectory's, the accuracy given
    either, and (alternative arms) the paired difference split via / beyond the first token;
    empty for summaries without the decomposition. A bin holding every token (the All row's
    tokens) is left out. `compact`: intervals only on the differences."""
    def share(value, ci=None) -> str:
        return "-" if value is None else f"{value:.3f}"

    plain = share if compact else interval
    every = summary["bins"]["All"]
    rows = []
    for name, group in groups(summary).items():
        if "first_token_match_standard" not in group:
            return []
        if name in summary["bins"] and name != "All" and group["tokens"] == every["tokens"]:
            continue
        for arm, label in ARM_LABELS.items():
            row = [name, label, plain(group[f"first_token_match_{arm}"], group[f"first_token_match_{arm}_ci"]),
                   plain(group[f"accuracy_{arm}_given_match"], group[f"accuracy_{arm}_given_match_ci"]),
                   plain(group[f"accuracy_{arm}_given_other"], group[f"accuracy_{arm}_given_other_ci"])]
            if arm == "standard":
                row += ["-"] * 5
            else:
                difference = f"{arm}_minus_standard"
                row += [interval(group[difference], group[f"{difference}_ci"]),
                        plain(group[f"{difference}_via_first_token"], group[f"{difference}_via_first_token_ci"]),
                        interval(group[f"{difference}_beyond_first_token"],
                                 group[f"{difference}_beyond_first_token_ci"]),
                        share(group[f"{arm}_same_first_token"]), share(group[f"{arm}_identical_continuations"])]
            rows.append(row)
    return rows


def notes(summary: dict) -> list[str]:
    """The lines under the tables: units, selection, how the best alternative was chosen, what
    the comparison can show, and what an old run's summary lacks."""
    selection = summary["selection"]
    every = summary["bins"]["All"]
    lines = []
    if "positions" in every:
        problems = (f"{every['problems']} problems" if every.get("problems") is not None else "no problem ids")
        lines.append(f"units: {every['tokens']} tokens at {every['positions']} positions of {every['trajectories']} "
                     f"trajectories, {problems}; intervals resample {resampled(summary)}")
    chosen = (f"tokens: {selection['chosen']} chosen by --tokens {selection['tokens']}"
              + (f" (--limit {selection['limit']}: {selection['limit_keeps']})" if selection.get("limit_keeps") else "")
              + (f", {selection['skipped_without_alternative']} skipped (no alternative expert set)"
                 if selection["skipped_without_alternative"] else "")
              + (f", {selection['wrong_trajectory_tokens_left_out']} of wrong trajectories left out (--include-wrong "
                 "keeps them)" if selection.get("wrong_trajectory_tokens_left_out") else ""))
    lines.append(chosen)
    if "best_by" in summary:
        lines.append(f"best alt: {summary['arms']['best_alt']}" + (
            f"; it is the proxy's own choice on {every['best_alt_is_realized_best']:.0%} of the tokens"
            if every.get("best_alt_is_realized_best") is not None else ""))
        lines.append(f"scope: {summary['scope']}")
    else:
        lines.append("best alt: the highest log p of the trajectory's next token (the only choice before --best-by: "
                     "chosen with that token)")
    if not first_token_rows(summary):
        lines.append(ABSENT)
    lines.append("proxy agrees: share of tokens whose outcome differs where the best alternative wins; via / beyond "
                 "first token: the paired difference from sample pairs whose first tokens differ / are the same "
                 "(definitions in summary.json)")
    return lines


def _rich(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column in ("bin", "arm") else "right")
    for row in rows:
        table.add_row(*row)
    return table


def rollout_table(summary: dict) -> Table:
    """Accuracy per arm and the paired differences against the standard route, per bin."""
    unit = resampled(summary)
    return _rich(f"rollouts: {summary['samples_per_arm']} continuation(s) per arm and token at "
                 f"T={summary['temperature']}, answers checked by {summary['checker']} (95% bootstrap CI over {unit}; "
                 f"* fewer than 10 {unit.split()[0]}; units: tokens / positions / problems)", MAIN_COLUMNS,
                 main_rows(summary))


def print_rollout_summary(summary: dict, console: Console | None = None) -> None:
    console = console or Console(width=190)
    console.print(rollout_table(summary))
    rows = first_token_rows(summary, compact=True)
    if rows:
        console.print(_rich("by the first emitted token: is it the trajectory's own next token (traj.'s: the proxy's "
                            "target)? same first / identical: paired samples (one random stream) that start alike / "
                            "are identical",
                            FIRST_TOKEN_COLUMNS, rows))
    for line in notes(summary):
        console.print(line)
