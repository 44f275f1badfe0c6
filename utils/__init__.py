"""Helpers of the ``train.py`` application: task data, run state on disk, evaluation.

The application imports the ``mas_optim`` library; the library never imports this package.
"""


class AppError(Exception):
    """A problem with the user's input or files (not a bug in the program).

    ``train.py`` prints it as one line on stderr and exits with code 2, without a traceback.
    """
