"""The version of the mpq-client distribution."""

__version__ = "0.1.0"
