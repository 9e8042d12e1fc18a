"""Errors that are the user's to fix: the command line prints them as one line and exits 2."""


class UserError(Exception):
    """Bad input (config, data, paths, model names). The message says what was wrong and what is valid."""


class TrainingStopped(Exception):
    """Training ended early on purpose (a signal, or too many non-finite steps); ``code`` is the exit status."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code
