"""Errors that are the user's to fix: the command line prints them as one line and exits 2."""
import argparse


class UserError(Exception):
    """Bad input (config, data, paths, model names). The message says what was wrong and what is valid."""


class TrainingStopped(Exception):
    """Training ended early on purpose (a signal, or too many non-finite steps); ``code`` is the exit status."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class InvalidInput(ValueError):
    """A value outside what is valid (a rank, a config field, a layer pattern), raised by the library.

    A ``ValueError``, so library users catch it as usual; the command line prints it as one line (exit 2),
    while any other ``ValueError`` is a bug and keeps its traceback.
    """


class AdapterFileError(ValueError):
    """An adapter file is missing, truncated, corrupt, contradicts another file, or does not fit the model."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its cause's, where datasets wraps one), for one-line errors."""
    while e.__cause__ is not None and "error occurred while generating" in str(e):  # datasets wraps the cause
        e = e.__cause__
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as a UserError: one line, exit 2, instead of the usage dump."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")
