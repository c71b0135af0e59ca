"""Expert grafting: donor experts copied into recipient slots (`grafting.py`), the grafted
folder written whole or not at all (`folder.py`), the evaluation of what the graft changed
(`evaluation.py`, run through the one run loop), and the order that checks everything
before anything is written (`pipeline.py`).

`result.py`, `table.py`, `report.py`, `command.py` (`routelens graft`): the same slice as
every analysis (see `routelens.analyses.counterfactual`).
"""
