"""Expert isolation (paper 2): every expert forced alone at each layer, against natural
routing and a random-routing floor, with per-cell statistics.

`config.py`, `analysis.py`, `result.py`, `table.py`, `report.py`, `command.py` (`routelens
isolate`): the same slice as every analysis (see `routelens.analyses.counterfactual`).
"""
