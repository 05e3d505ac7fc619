"""Errors a user fixes from the message alone: `python -m aql` prints them as one line,
`aql: error: <message>`, and exits with code 2 (the traceback only with `--debug` or `AQL_DEBUG=1`).

Each message names what is wrong (the config key, the file, the data set) and what to do instead.
The classes also derive from the built-in type that library callers catch today (`ValueError`,
`FileNotFoundError`, `ImportError`), so `except ValueError` keeps working around the code that raises them.
`aql.config.ConfigError` is one of them.
"""

from __future__ import annotations

__all__ = ["AQLError", "DataError", "DataNotFoundError", "TokenizerError", "MissingExtraError", "require"]


class AQLError(Exception):
    """Base of the errors that the command line reports as one line (no traceback)."""


class DataError(AQLError, ValueError):
    """A data set that cannot be reached or read, or that holds too little to train on."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A local data path (text file, folder, saved dataset) that does not exist."""


class TokenizerError(AQLError, ValueError):
    """A tokenizer that cannot be loaded: not cached, not reachable, or not a tokenizer."""


class MissingExtraError(AQLError, ImportError):
    """An optional dependency that is not installed; the message names the `pip install` command."""


def require(module: str, extra: str, what: str):
    """Imports and returns `module`, or raises MissingExtraError: "`what` needs the `module` package,
    which is not installed; pip install 'aql[extra]'"."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        if (error.name or "").split(".")[0] != module.split(".")[0]:
            raise  # the package is there but something it imports is broken: the original error says what
        raise MissingExtraError(f"{what} needs the {module.split('.')[0]} package, which is not installed; "
                                f"pip install 'aql[{extra}]'") from None
