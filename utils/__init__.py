"""The ``train.py`` application around the library: settings, methods, the training loop,
task data, run state on disk, evaluation, torchrun support.

The application imports the ``mas_optim`` library; the library never imports this package.
"""


class AppError(Exception):
    """A problem with the user's input or files (not a bug in the program).

    ``train.py`` prints it as one line on stderr and exits with code 2, without a traceback.
    """


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of ``exc``'s message (its type name if it has none), at most ``limit``
    characters: how an exception from a library is quoted inside a one-line ``AppError``."""
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else type(exc).__name__
