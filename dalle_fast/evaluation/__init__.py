"""Evaluation of trained runs: caption fidelity on the built-in data."""
