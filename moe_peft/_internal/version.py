"""The release, in one place: the package's `__version__` and the version recorded in exports."""

__version__ = "0.2.0"
