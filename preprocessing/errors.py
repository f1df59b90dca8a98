"""Exception families of the preprocessing layer."""

from __future__ import annotations


class IngestError(Exception):
    """A series or file could not be read into a volume (undecodable, truncated, inconsistent)."""


class GeometryError(IngestError):
    """A series' geometry cannot be represented faithfully (gap, tilt, mixed orientations...)."""


class DatasetError(Exception):
    """A training dataset (MSD layout) is invalid: missing labels, bad label values, mismatched geometry."""
