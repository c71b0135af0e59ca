"""What the analyses' summary DataFrames share: intervals split into `<metric>_ci_low` /
`<metric>_ci_high` columns. Each analysis reads its own frame off summary.json in its
`result.py` (the result's `.summary`, which `routelens export` writes too), so a paper's
table and a notebook's frame are the same numbers.
"""

from __future__ import annotations


def split_intervals(row: dict) -> dict:
    """{"gain_ci": [a, b]} -> {"gain_ci_low": a, "gain_ci_high": b}, other keys kept in order."""
    out = {}
    for key, value in row.items():
        if key.endswith("_ci") or key == "ci":
            low, high = value if value is not None else (None, None)
            out[f"{key}_low"], out[f"{key}_high"] = low, high
        else:
            out[key] = value
    return out
