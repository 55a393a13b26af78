"""layerdiff: adjacent-layer weight analysis straight from safetensors shards."""

__version__ = "0.1.0"
