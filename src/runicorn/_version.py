"""The package version, in a module of its own so that every layer can read it without
importing the package facade (which would import every layer)."""

__version__ = "0.4.0"
