"""VNE as a python-ismrmrd-server module: ``process(connection, config, metadata)``.

For a site that already runs `python-ismrmrd-server <https://github.com/kspaceKelvin/python-ismrmrd-server>`_
(or a FIRE / OpenRecon image built on it): install the ``vne`` package into that server's Python
environment (``pip install /path/to/vne``), then either

- copy this file into the server's folder (next to ``invertcontrast.py``) and send the config
  name ``vne_mrd`` (CONFIG_FILE ``vne_mrd``, or ``parameters.config`` / ``customconfig`` =
  ``vne_mrd`` in the JSON text after the header); or
- without copying anything, send the config name ``gadgets.vne_mrd`` (the server imports the
  module named by the config with ``importlib``, dotted names included).

The file is not named ``vne.py``: that would shadow the ``vne`` package it drives.

The conventions followed are those of python-ismrmrd-server's ``server.py``, ``connection.py``
and ``invertcontrast.py`` (read at commit df45f516ac5e):

- ``connection`` iterates over ``ismrmrd.Acquisition`` / ``ismrmrd.Image`` / ``ismrmrd.Waveform``
  items and ``str`` (TEXT messages), and yields ``None`` when the client's CLOSE (or the end of
  the stream) is read; it has ``send_image`` (one image or a list), ``send_acquisition``,
  ``send_waveform``, ``send_logging(level, text)`` and ``send_close``.
- ``config`` is the config name (str), or the parsed JSON of the TEXT message that followed the
  header (``{"parameters": {...}}``, OpenRecon's UI parameters).
- ``metadata`` is the ISMRMRD header parsed by ``ismrmrd.xsd.CreateFromDocument``, or the XML
  text when it could not be parsed.
- The module ends the session with ``connection.send_close()`` (``invertcontrast.py`` does, in a
  ``finally``; the server itself only closes the socket after ``process`` returns).

What it does: every item goes through the same :class:`vne.runtime.pipeline.VNEPipeline` as the Gadgetron
gadget and ``vne serve`` (``feed_iter`` yields the item itself first, unchanged, then any VNE
images that became ready; ``finish`` returns the rest). Each input image, acquisition and
waveform is sent back unchanged before any VNE work is done for it; VNE images follow as their
own series; every problem the pipeline reports goes back as a ``send_logging`` message
(``WARNING``), and a summary as ``INFO``. Nothing raises out of ``process``.

Parameters (``config["parameters"]``): the client-settable VNE properties
(:data:`vne.runtime.config.PROPERTY_DOCS` minus :data:`vne.runtime.config.SERVER_ONLY_PROPERTIES`), by their
property name (``pixel_type``) or by their OpenRecon parameter id, which is the property name
without underscores (``pixeltype``: OpenRecon ids must match ``^[A-Za-z0-9]+$``; see
``docker/openrecon/label.json``). Other parameters (scanner UI options) are ignored.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import ismrmrd

from vne.runtime import mrd_server
from vne.errors import InputError
from vne.io.framing import RawImage
from vne.runtime.config import PROPERTY_DOCS, SERVER_ONLY_PROPERTIES, PipelineConfig
from vne.runtime.pipeline import VNEPipeline
from vne.runtime.study_store import wait_for_write

log = logging.getLogger("vne.mrd_module")

CONFIG_NAME = "vne_mrd"

# python-ismrmrd-server's constants.MRD_LOGGING_* (the level is padded to 8 characters;
# Connection.send_logging sends "<level> <text>")
MRD_LOGGING_DEBUG = "DEBUG   "
MRD_LOGGING_INFO = "INFO    "
MRD_LOGGING_WARNING = "WARNING "
MRD_LOGGING_ERROR = "ERROR   "
MRD_LOGGING_CRITICAL = "CRITICAL"


def openrecon_id(prop: str) -> str:
    """The OpenRecon parameter id of a VNE property: its name without underscores
    (``pixel_type`` -> ``pixeltype``; OpenRecon's schema allows ``[A-Za-z0-9]`` only)."""
    return prop.replace("_", "")


def client_settable_properties() -> list[str]:
    """The VNE properties a stream's client may set (all of :data:`PROPERTY_DOCS` except the
    server-only ones and the ``role_<rule>`` pattern), in documentation order."""
    return [p for p in PROPERTY_DOCS if p not in SERVER_ONLY_PROPERTIES and "<" not in p]


# OpenRecon id (lower case) -> property name, and the property names themselves
PARAMETER_ALIASES: dict[str, str] = {openrecon_id(p).lower(): p for p in PROPERTY_DOCS if "<" not in p}


def client_properties(config) -> tuple[dict[str, str], list[str]]:
    """(pipeline properties, notes) from ``config``: its ``parameters`` with OpenRecon ids
    translated to property names, then the same rules as ``vne serve --protocol mrd``
    (:func:`vne.runtime.mrd_server.vne_properties`: server-only properties refused with a note, other
    names ignored)."""
    params = config.get("parameters") if isinstance(config, dict) else None
    if not isinstance(params, dict):
        return {}, []
    translated = {}
    for k, v in params.items():
        name = str(k).strip()
        if name not in PROPERTY_DOCS and not name.lower().startswith("role_"):
            name = PARAMETER_ALIASES.get(name.lower(), name)
        translated[name] = v
    return mrd_server.vne_properties({"parameters": translated})


def _kind(item) -> str:
    if isinstance(item, (ismrmrd.Image, RawImage)):
        return "image"
    if isinstance(item, ismrmrd.Acquisition):
        return "acquisition"
    if isinstance(item, ismrmrd.Waveform):
        return "waveform"
    return "other"


def _send_back(connection, item, kind: str) -> None:
    if kind == "image":
        connection.send_image(item)
    elif kind == "acquisition":
        connection.send_acquisition(item)
    elif kind == "waveform":
        connection.send_waveform(item)


def _make_pipeline(connection, config, metadata, defaults, model) -> VNEPipeline | None:
    props, notes = client_properties(config)
    for note in notes:
        connection.send_logging(MRD_LOGGING_WARNING, f"vne: {note}")
    config_error = None
    try:
        cfg = PipelineConfig.from_properties(props, base=defaults, trusted=False)
    except InputError as exc:
        config_error = str(exc)
        cfg = replace(defaults or PipelineConfig(), enabled=False)
    try:
        pipeline = VNEPipeline(cfg, header=metadata, model=model)
    except Exception as exc:  # the pipeline promises not to raise; pass-through must not depend on it
        log.exception("vne_mrd: VNE pipeline could not be made")
        connection.send_logging(MRD_LOGGING_ERROR, f"vne: VNE unavailable ({exc.__class__.__name__}: {exc}); "
                                                   f"passing everything back")
        return None
    if config_error:
        pipeline.problems = [m for m in pipeline.problems if "'enabled' property" not in m]
        pipeline._disable(f"bad parameters: {config_error}")
    return pipeline


def process(connection, config, metadata, *, defaults: PipelineConfig | None = None, model=None):
    """Serve one python-ismrmrd-server connection with VNE (see the module docstring).

    Args:
        connection: python-ismrmrd-server's ``Connection`` (or anything with its iteration and
            ``send_*`` methods).
        config: the config name, or the JSON config (dict) whose ``parameters`` set VNE properties.
        metadata: the ISMRMRD header (parsed, XML text, or None).
        defaults: settings the parameters go on top of (default: :class:`PipelineConfig`, whose
            model and study cache come from ``$VNE_MODEL`` / ``$VNE_MODEL_DIR`` / ``$VNE_CACHE_DIR``).
        model: an already loaded :class:`vne.runtime.model.VNEModel` (default: loaded once per process).

    Returns:
        the :class:`vne.runtime.pipeline.VNEPipeline` (None if it could not be made).
    """
    counts = {"image": 0, "acquisition": 0, "waveform": 0, "other": 0}
    n_vne = 0
    done = 0
    pipeline = None

    def forward_problems() -> None:
        nonlocal done
        if pipeline is None:
            return
        for msg in pipeline.problems[done:]:
            connection.send_logging(MRD_LOGGING_WARNING, f"VNE: {msg}")
        done = len(pipeline.problems)

    try:
        pipeline = _make_pipeline(connection, config, metadata, defaults, model)
        forward_problems()
        dropped = False
        try:
            for item in connection:
                if item is None:  # the client's CLOSE (or the end of the stream)
                    break
                if isinstance(item, str):  # a TEXT message from the client
                    log.info("vne_mrd: client text: %s", item[:200])
                    continue
                kind = _kind(item)
                counts[kind] += 1
                if kind == "other":
                    connection.send_logging(MRD_LOGGING_WARNING, f"vne: {type(item).__name__} item not supported; "
                                                                 f"not passed back")
                    continue
                if pipeline is None:
                    _send_back(connection, item, kind)
                    continue
                for out in pipeline.feed_iter(item):
                    if out is item:
                        _send_back(connection, item, kind)  # first, and whatever happens to VNE
                    else:
                        connection.send_image(out)
                        n_vne += 1
                forward_problems()
        except Exception as exc:  # a reader error in the connection (unknown message, bad bytes)
            dropped = True
            log.exception("vne_mrd: stream unreadable")
            connection.send_logging(MRD_LOGGING_ERROR, f"vne: input not read further ({exc.__class__.__name__}: "
                                                       f"{exc}); every item read before was passed back")
        if pipeline is not None:
            last = pipeline.finish(dropped=dropped)
            if last:
                connection.send_image(list(last))
                n_vne += len(last)
            forward_problems()
            wait_for_write(pipeline.cache_thread)  # the study-cache write is on disk before our CLOSE
            series = sorted({r.series_index for r in pipeline.results})
            connection.send_logging(
                MRD_LOGGING_INFO,
                f"vne: {counts['image']} image(s), {counts['acquisition']} acquisition(s), {counts['waveform']} "
                f"waveform(s) passed back unchanged; {n_vne} VNE image(s)"
                + (f" in series {', '.join(map(str, series))}" if series else ""))
    except Exception as exc:  # a bug here must cost a logging message, not the session
        log.exception("vne_mrd: internal error")
        try:
            connection.send_logging(MRD_LOGGING_ERROR, f"vne: internal error ({exc.__class__.__name__}: {exc})")
        except Exception:
            pass
    finally:
        try:
            connection.send_close()
        except Exception as exc:
            log.error("vne_mrd: could not send CLOSE (%s)", exc)
    return pipeline
