"""Architecture tables as data: `data/*.json` (one file per architecture family, `_*.json`
fragments used through `extends`, `families.json`, `common.json`), checked by `schema`,
loaded by `registry` (plus LAYERDIFF_ARCH_PATH's directories), sized by `sizes`. The format
is described in README.md beside this file; docs/ARCHITECTURES.md is made by `docs`."""

from .registry import Registry, load

__all__ = ["Registry", "load"]
