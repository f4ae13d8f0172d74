"""Presentation: rich tables and progress (console.py, tables.py) and seaborn figures (plots.py)."""
