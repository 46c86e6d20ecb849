"""Argument types shared by several subcommands."""
from __future__ import annotations

import argparse


def port_number(text: str) -> int:
    """argparse type of ``--port``: 0 (any free port) to 65535; the OS would wrap or misreport others."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: not a number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {port}: must be 0 (any free port) to 65535")
    return port
