"""layerdiff: adjacent-layer weight analysis straight from safetensors shards."""

__version__ = "0.1.0"
SCHEMA = "layerdiff.scan/1"  # the result document's format, written into it and checked by `plot`
