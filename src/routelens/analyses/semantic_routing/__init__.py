"""Semantic (fingerprint) routing against natural routing, an oracle and a random floor.

`config.py`, `analysis.py`, `result.py`, `table.py`, `report.py`, `command.py` (`routelens
semantic-route`): the same slice as every analysis (see `routelens.analyses.counterfactual`).
"""
