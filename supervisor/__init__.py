"""The supervisor process: the loop, the components it calls, the registry and the config."""
