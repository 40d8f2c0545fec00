"""The package version, one place for setup and the runtime; it must import nothing."""

__version__ = "0.1.0"
