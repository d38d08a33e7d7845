"""Errors that are a user's mistake: the commands print their message and exit with status 2."""


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and what is allowed."""
