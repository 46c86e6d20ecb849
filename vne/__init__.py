"""VNE: virtual native enhancement (gadolinium-free virtual LGE) for cardiac MR, inline in Gadgetron.

The importable runtime library. Nothing in ``vne`` imports torch; training lives in ``training/``.
"""
__version__ = "0.1.0"
