"""Rollouts: continuations of scored tokens under the standard, the best and a random
alternative route, with the final answers checked.

`config.py`, `analysis.py`, `result.py`, `table.py`, `report.py`, `command.py` (`routelens
rollout`): the same slice as every analysis (see `routelens.analyses.counterfactual`).
"""
