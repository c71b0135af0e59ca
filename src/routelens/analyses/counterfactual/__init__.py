"""Counterfactual routing (paper 1): the standard route of every scored token against S
sampled equal-compute alternatives, at one or several layers (joint layers too).

One folder, one analysis: `config.py` (its settings, which are the command's options),
`analysis.py` (the unit job, the summary and the run through `routelens.runs.loop`),
`input.py` (reading a finished run back, for the analyses built on it), `result.py` (what
the API returns), `table.py` (what the command prints), `report.py` (its report section
and figures) and `command.py` (`routelens counterfactual`).
"""
