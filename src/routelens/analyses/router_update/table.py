"""What `routelens router-update` prints of its held-out check, read from its summary.json."""

from __future__ import annotations


def changed_gain_line(changes: dict) -> str:
    """Whether the changed routes are better, in one line (runs made before it: none)."""
    every = changes["All"]
    if "changed_gain" not in every:
        return "this run was made before the changed routes were scored: re-run to score them"
    if every["changed_gain"] is None:
        return "no held-out route changed: nothing to score"
    low, high = every["changed_gain_ci"]
    test = every["sign_test"] or {}
    return (f"changed routes, p(next token) new - old: {every['changed_gain']:+.4f}"
            + (f" [{low:+.4f}, {high:+.4f}]" if low is not None else "")
            + f" over {changes['cluster_unit']}; improved {every['improved']}, worsened {every['worsened']}, "
              f"tied {every['tied']}; sign test p "
            + ("-" if test.get("p_value") is None else f"{test['p_value']:.2g}")
            + (" (held-out run = training run: not held out)" if changes.get("same_run_as_training") else ""))
