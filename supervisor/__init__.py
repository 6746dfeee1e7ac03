"""The supervisor process, the wire protocol, the client and the CLI."""
