"""Command-line entry points: an error the user can cause prints as one short message, `--debug` shows the traceback."""

from __future__ import annotations

import sys
from argparse import ArgumentError
from collections.abc import Callable
from pathlib import Path

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, KeyError, ArgumentError)  # bad options, paths, files


def run_cli(main: Callable[[list[str]], object]) -> None:
    """Runs ``main(arguments)`` on the command line less ``--debug``, for a script's ``__main__``.

    A user error (`USER_ERRORS`) exits with status 1 after printing ``error: <message>`` on stderr, the message being
    that of its root cause (`user_message`); with ``--debug`` it propagates with its full traceback.
    """
    debug = "--debug" in sys.argv[1:]
    try:
        main([argument for argument in sys.argv[1:] if argument != "--debug"])
    except USER_ERRORS as error:
        if debug:
            raise
        script = Path(sys.argv[0]).name
        tip = f"\n`python {script} --help` lists every option." if isinstance(error, ArgumentError) else ""
        sys.exit(f"error: {user_message(error)}{tip}\n(`--debug` shows the traceback.)")


def user_message(error: BaseException) -> str:
    """The message of `error`, or for an error jsonargparse wrapped, of the first in its chain raised outside jsonargparse.

    jsonargparse (under LightningCLI) wraps an exception raised while it instantiates a class in a ValueError of its own
    that lists every type it tried; the user-facing message is that of the exception it wraps. Its ArgumentError (a bad
    option) is the user-facing message itself.
    """
    cause = error
    while _raised_in_jsonargparse(cause) and not isinstance(cause, ArgumentError) and (cause.__cause__ or cause.__context__):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, KeyError) and cause.args:
        return str(cause.args[0])  # str(KeyError) is the repr of its argument
    return str(cause)


def _raised_in_jsonargparse(error: BaseException) -> bool:
    traceback = error.__traceback__
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    return traceback is not None and "jsonargparse" in Path(traceback.tb_frame.f_code.co_filename).parts
