"""Every recipe registers itself on import."""

from . import teacher  # noqa: F401
