"""The one user-facing error type of the package."""


class InputError(ValueError):
    """Bad or incomplete user input: reported as one line, never as a traceback."""
