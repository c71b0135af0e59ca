"""The router-only update of the last MoE layer (paper 1's last experiment), resumable.

`config.py`, `analysis.py`, `result.py`, `report.py`, `command.py` (`routelens
router-update`): the same slice as every analysis (see `routelens.analyses.counterfactual`).
"""
