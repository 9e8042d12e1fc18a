"""Errors that are the user's to fix: the command line prints them as one line and exits 2."""


class UserError(Exception):
    """Bad input (config, data, paths, model names). The message says what was wrong and what is valid."""
