"""The routing replay audit: an inference engine's routes (or a second Hugging Face run's)
against the model's own, flip by flip, with the router's margin and what forcing them at
every layer costs in next-token log-prob and KL.

`config.py`, `analysis.py`, `result.py`, `table.py`, `report.py`, `command.py` (`routelens
replay`): the same slice as every analysis (see `routelens.analyses.counterfactual`).
"""
