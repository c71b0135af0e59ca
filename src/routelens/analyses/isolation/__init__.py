"""Expert isolation (paper 2): every expert forced alone at each layer, against natural
routing and random-routing floors, with per-cell statistics; with the equal-compute arms
(default), also at the natural gate mass and against a single-expert floor, the verdict's
baseline.

`config.py`, `analysis.py`, `result.py`, `table.py`, `report.py`, `command.py` (`routelens
isolate`): the same slice as every analysis (see `routelens.analyses.counterfactual`);
`comparisons.py` names the arms and the five comparisons once, for all of them.
"""
