"""Experiments as researchers run them: sweeps (sweep.py), run reports with plots (report.py),
token streaming for generate.py, recipes (recipe.py). Library code; the scripts stay thin."""
