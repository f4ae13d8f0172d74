"""``python -m sam_probe.loading.sources``: print the README table of checkpoint sources."""
from . import markdown_table

print(markdown_table())
