"""Run folders, result objects and summary tables."""
