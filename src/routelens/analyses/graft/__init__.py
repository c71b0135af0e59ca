"""Expert grafting: donor experts copied into recipient slots (`grafting.py`), and the
evaluation of what the graft changed (`evaluation.py`, run through the one run loop).

`result.py`, `table.py`, `report.py`, `command.py` (`routelens graft`): the same slice as
every analysis (see `routelens.analyses.counterfactual`).
"""
