"""A rollout's `tokens` file: the (trajectory_id, position, layer) rows a user chose, as
JSONL, Parquet or CSV, each row checked before the model loads. Anything that is not a
trajectory id, a position >= 0 and a layer (both integers) is refused in one line naming
the row; whether the counterfactual run scored each token is checked against its table."""

from __future__ import annotations

import csv
import io
import os
import re

import pandas as pd

from routelens.data.trajectories import read_utf8_text
from routelens.errors import RouteLensError

KEYS = ("trajectory_id", "position", "layer")
EXPECTED = "rows of trajectory_id, position and layer (a JSONL, Parquet or CSV file)"
_INTEGER = re.compile(r"[+-]?\d+")


def _csv_records(path: str) -> list[dict]:
    """The rows of a CSV file with a header line, as dicts with "_where"; binary, non-UTF-8 or
    malformed text, and rows whose field count is not the header's, are one-line errors."""
    text = read_utf8_text(path, "CSV", EXPECTED, encoding="utf-8-sig")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    records, header = [], None
    try:
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = [cell.strip() for cell in row]
                continue
            if len(row) != len(header):
                raise RouteLensError(f"{path} line {reader.line_num}: {len(row)} field(s) where the header "
                                     f"({','.join(header)}) has {len(header)}; give {EXPECTED}")
            records.append({**{name: cell.strip() for name, cell in zip(header, row)},
                            "_where": f"{path} line {reader.line_num}"})
    except csv.Error as error:
        raise RouteLensError(f"{path} line {reader.line_num}: malformed CSV ({error}); give {EXPECTED}") from None
    return records


def _integer(value) -> int | None:
    """An integer given as a number or as text (3, 3.0, "3"); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        return int(value.strip())
    return None


def read_token_file(path: str) -> pd.DataFrame:
    """The file's rows as a DataFrame of trajectory_id (str), position and layer (int), in
    file order, each checked, or a one-line error naming the row at fault."""
    from routelens.data.trajectories import read_records

    if os.path.isdir(path):
        raise RouteLensError(f"`tokens` {path} is a folder; give a file of {EXPECTED}")
    records = _csv_records(path) if path.lower().endswith(".csv") else read_records(path, "token file")
    if not records:
        raise RouteLensError(f"{path}: the file is empty; give {EXPECTED}")
    rows = []
    for index, record in enumerate(records):
        where = record.pop("_where", f"{path} row {index + 1}")
        missing = [key for key in KEYS if key not in record]
        if missing:
            raise RouteLensError(f"{where}: missing {', '.join(missing)}; each row needs trajectory_id, position "
                                 f"and layer (the file's fields: {', '.join(map(str, record)) or 'none'})")
        trajectory_id = record["trajectory_id"]
        if not isinstance(trajectory_id, (str, int)) or isinstance(trajectory_id, bool) or not str(trajectory_id).strip():
            raise RouteLensError(f"{where}: trajectory_id must be a trajectory's id (text), got {trajectory_id!r}")
        position, layer = _integer(record["position"]), _integer(record["layer"])
        if position is None or position < 0:
            raise RouteLensError(f"{where}: position must be an integer >= 0 (a token's index in its trajectory), "
                                 f"got {record['position']!r}")
        if layer is None:
            raise RouteLensError(f"{where}: layer must be an integer (a layer the run scored), got {record['layer']!r}")
        rows.append((str(trajectory_id), position, layer))
    return pd.DataFrame(rows, columns=list(KEYS))


def scored_tokens(tokens: pd.DataFrame, path: str) -> pd.DataFrame:
    """The run's `tokens` rows that the file at `path` names (each once, in the run's order);
    a trajectory, or a token, the run did not score is a one-line error."""
    wanted = read_token_file(path).drop_duplicates()
    scored = dict.fromkeys(tokens["trajectory_id"])
    unknown = [tid for tid in dict.fromkeys(wanted["trajectory_id"]) if tid not in scored]
    if unknown:
        shown = ", ".join(repr(tid) for tid in list(scored)[:5]) + (", ..." if len(scored) > 5 else "")
        raise RouteLensError(f"{path}: trajectory {unknown[0]!r} was not scored by the counterfactual run (it scored "
                             f"{len(scored)} trajectories: {shown}); list tokens of its tokens.parquet")
    chosen = tokens.merge(wanted, on=list(KEYS))
    if len(chosen) < len(wanted):
        known = set(zip(tokens["trajectory_id"], tokens["position"], tokens["layer"]))
        absent = next(row for row in wanted.itertuples(index=False) if tuple(row) not in known)
        of = tokens[(tokens["trajectory_id"] == absent.trajectory_id)]
        at = of[of["layer"] == absent.layer]["position"]
        where = (f"it scored positions {int(at.min())}..{int(at.max())} of trajectory {absent.trajectory_id!r} at layer "
                 f"{absent.layer}" if len(at) else f"it scored layer(s) {', '.join(map(str, sorted(set(of['layer']))))}")
        token = (absent.trajectory_id, int(absent.position), int(absent.layer))
        raise RouteLensError(f"{path}: token {token} (trajectory_id, position, layer) was not scored by the "
                             f"counterfactual run ({where}); list tokens of its tokens.parquet")
    return chosen
