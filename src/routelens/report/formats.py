"""Text formats that the printed tables and the report share (values with intervals, p-values)."""

from __future__ import annotations


def with_interval(value, interval, digits: int = 3) -> str:
    if value is None:
        return "-"
    low, high = interval
    text = f"{value:.{digits}f}"
    return text if low is None else f"{text} [{low:.{digits}f}, {high:.{digits}f}]"


def p_value_text(test: dict | None) -> str:
    if not test or test.get("p_value") is None:
        return "-"
    return f"{test['p_value']:.2g}"


def q_value_text(test: dict | None) -> str:
    """A test's Benjamini-Hochberg q in two significant digits ("-" where the run has none)."""
    return "-" if not test or test.get("q_value") is None else f"{test['q_value']:.2g}"


def interval_text(interval) -> str:
    low, high = interval
    return "-" if low is None else f"[{low:+.3f}, {high:+.3f}]"
