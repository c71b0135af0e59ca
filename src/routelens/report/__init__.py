"""Figures and a self-contained HTML report from run folders (`routelens report`)."""
