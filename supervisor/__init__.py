"""The supervisor process, the wire protocol, the client and the CLI."""

__version__ = "0.1.0"
