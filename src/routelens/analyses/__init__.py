"""The analyses, one folder each (a vertical slice).

A folder holds everything of one analysis: its settings (`config.py`, whose fields are the
command's options), its unit job and summary (`analysis.py`, run by the one run loop,
`routelens.runs.loop`), what the API returns (`result.py`), what the command prints
(`table.py`), its report section and figures (`report.py`) and its command (`command.py`).
What several analyses use lives beside them: `route_sampling.py` here, statistics in
`routelens.stats`, answer checkers in `routelens.evaluation`. Nothing here is imported by
`import routelens`; `routelens --help` reads only `config.py`
and `command.py`.
"""
