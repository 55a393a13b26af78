"""Metrics stage: sums -> metrics by a registry of definitions, spectra, the scale track."""
