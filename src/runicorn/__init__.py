"""Runicorn manifest-based sync: publish one manifest of every run on a lab server, and
mirror the runs onto a laptop over SSH by fetching only what changed."""

from __future__ import annotations

import logging

__version__ = "0.4.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["__version__"]
