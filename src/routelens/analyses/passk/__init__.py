"""pass@k with bootstrap intervals, of one model or of a base and its router update.

`config.py`, `analysis.py`, `result.py`, `table.py`, `report.py`, `command.py` (`routelens
passk`): the same slice as every analysis (see `routelens.analyses.counterfactual`).
"""
