"""Presentation: text tables, inspect listing, plots. Reads typed results."""
