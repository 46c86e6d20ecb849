"""The one user-facing error type of the package."""


class InputError(ValueError):
    """Bad or incomplete user input: reported as one line, never as a traceback."""


def reason(exc: BaseException) -> str:
    """A library's exception as one short line for an :class:`InputError`: ``"ValueError: first line"``."""
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0][:160]}" if text else exc.__class__.__name__
