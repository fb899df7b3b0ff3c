"""The package version, kept in one place (read by hatchling and the package)."""

__version__ = "0.2.0"
