"""The VNE gadget for Gadgetron's Python external interface (``gadgetron.external``).

Gadgetron starts it per stream (``<execute name="gadgets.vne_gadget" target="gadget"
type="python"/>``: ``python -m gadgetron <port> gadgets.vne_gadget gadget``), or ``vne serve``
runs it behind a listening socket (``<connect port="18000"/>``). Either way Gadgetron sends the
``<configuration>`` of the ``<external>`` node (CONFIG), the ISMRMRD header (HEADER), the
images, then CLOSE; ``gadgetron.external.Connection`` parses the first two into
``connection.config`` (an ElementTree element) and ``connection.header``.

The gadget is thin: it takes the connection's socket over (:mod:`vne.runtime.gadgetron_link`), sends
every data message on at once by its exact bytes, before decoding a copy of it, and
:mod:`vne.runtime.pipeline` adds the VNE series when a slice is complete (properties:
:data:`vne.runtime.config.PROPERTY_DOCS`, docs/gadget.md). It never raises on bad data; when the
stream cannot be framed further or is lost it logs one reason, finishes and sends CLOSE.
"""
from __future__ import annotations

from vne.runtime.gadgetron_link import run_connection
from vne.runtime.config import PipelineConfig


def gadget(connection, defaults: PipelineConfig | None = None, model=None):
    """Process one Gadgetron external connection (pass-through first, then VNE images).

    Args:
        connection: ``gadgetron.external.Connection`` (execute mode) or a
            :class:`vne.runtime.gadgetron_link.GadgetronLink` (``vne serve``).
        defaults: settings under the connection's properties (``vne serve`` options).
        model: a loaded :class:`vne.runtime.model.VNEModel` to reuse (``vne serve``).

    Returns:
        the :class:`vne.runtime.pipeline.VNEPipeline` that served the connection.
    """
    return run_connection(connection, defaults, model=model)
