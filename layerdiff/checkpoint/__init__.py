"""Checkpoint stage: MODEL -> files (sources), headers -> index (index), bytes -> blocks (reader)."""
