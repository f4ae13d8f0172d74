"""Presentation, from stored result dicts only: rich tables fitted to the terminal (console.py,
tables.py), one view module per analysis (its tables, caption and figures; views.py holds what
they share), seaborn figures (figures.py), the settings a unit was computed with
(unit_settings.py) and the HTML page (html.py)."""
