"""Analyses: functions from (model, data, config) to result tables."""
