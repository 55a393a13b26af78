"""Tensor names -> (stack, layer, family): the data model (`model`), how tables and the main
stack are chosen (`select`), and the builder (`build`). The tables are data: layerdiff/archs."""

from ..checkpoint.index import grid
from .build import build_layout
from .model import (
    FAMILY_KINDS,
    SEED_FAMILIES,
    Layout,
    Member,
    Refused,
    Stack,
    TableMatch,
    aggregate_name,
    aggregate_raw,
    aggregate_sums,
    family_kind,
    family_order,
    is_bias,
)

__all__ = [
    "FAMILY_KINDS", "SEED_FAMILIES", "Layout", "Member", "Refused", "Stack", "TableMatch", "aggregate_name", "aggregate_raw",
    "aggregate_sums", "build_layout", "family_kind", "family_order", "grid", "is_bias",
]
