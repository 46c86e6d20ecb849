"""ISMRMRD HDF5 files: write one atomically, read the header and every image of one in stream order.

Files written by other tools are read as they are (docs/roles.md, "Who writes what"): any
top-level group (``dataset``, the only one, or one named with ``group``), every image group
whatever its name, and python-ismrmrd-server's dicom2mrd.py conventions (``position`` = DICOM
ImagePositionPatient with the full DICOM header in a base64 ``DicomJson`` meta, read by
:mod:`vne.io.mrd.dicom2mrd`). A file whose positions look like first pixels without such a
header is reported once on reading (:mod:`vne.io.mrd.position_convention`).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import ismrmrd

from ...errors import InputError
from ..atomic import atomic_path
from .position_convention import check_position_convention

# One logger for the whole of vne.io.mrd: log lines read as they did before it was split.
log = logging.getLogger("vne.io.mrd")


def write_mrd_file(path: Path, header: str, images: list[ismrmrd.Image], group: str = "dataset") -> Path:
    """Write an ISMRMRD HDF5 file atomically: header, then images grouped per series.

    Images go to ``/<group>/image_<series_index>`` in the order given (the scanner's order).
    """
    path = Path(path)
    with atomic_path(path, suffix=".h5.tmp") as tmp:
        ds = ismrmrd.Dataset(str(tmp), group, create_if_needed=True)
        ds.write_xml_header(header)
        for im in images:
            ds.append_image(f"image_{im.image_series_index}", im)
        ds.close()
    return path


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(name))]


def _ordered_keys(group) -> list[str]:
    """Member names in file order: creation order where the file tracks it, else by name with
    numbers compared as numbers (``image_2`` before ``image_10``)."""
    keys = list(group.keys())
    try:
        tracked = bool(group.id.get_create_plist().get_link_creation_order())
    except Exception:
        tracked = False
    return keys if tracked else sorted(keys, key=_natural_key)


def _resolve_group(f, path: Path, group: str | None) -> str:
    """The top-level group that holds the data: ``group`` if given, else ``dataset``, else the
    only top-level group (an MRD client output file names it after a timestamp)."""
    import h5py

    names = [k for k in _ordered_keys(f) if isinstance(f.get(k), h5py.Group)]
    if group:
        if isinstance(f.get(group), h5py.Group):
            return group
        raise InputError(f"{path}: no group '{group}' (groups: {', '.join(names) or 'none'})")
    if "dataset" in names:
        return "dataset"
    if len(names) == 1:
        return names[0]
    if not names:
        raise InputError(f"{path}: not an ISMRMRD file (no HDF5 groups)")
    raise InputError(f"{path}: {len(names)} top-level groups and none is 'dataset' "
                     f"({', '.join(repr(n) for n in names)}); choose one with --group NAME")


def _is_image_group(obj) -> bool:
    """An ISMRMRD image group: ``header`` (image headers) and ``data`` datasets, whatever its name."""
    import h5py

    if not isinstance(obj, h5py.Group):
        return False
    head, data = obj.get("header"), obj.get("data")
    if not (isinstance(head, h5py.Dataset) and isinstance(data, h5py.Dataset)):
        return False
    names = head.dtype.names or ()
    return "image_series_index" in names and "matrix_size" in names and data.ndim == 5


def read_mrd_file(path: Path, group: str | None = None) -> tuple[str, list[ismrmrd.Image]]:
    """Read the header and every image of an ISMRMRD HDF5 file, in stream order.

    The file is opened read-only (several readers can share it). The data group is ``group`` if
    given, else ``/dataset``, else the only top-level group (python-ismrmrd-server's client names
    it after a timestamp); several top-level groups without a ``dataset`` need ``group``.
    Every image group in it is read, whatever its name (``image_3``, ``images_3``,
    ``cine_SAX_1``): any subgroup with image ``header`` and ``data`` datasets.

    Stream order: the image groups in file order (creation order where the file tracks it, else
    by name with numbers compared as numbers), images in each in stored order, then sorted
    stably by the images' ``acquisition_time_stamp`` when those are set (the scanner's order).

    Raises:
        InputError: no such file, not HDF5, a missing or ambiguous group, no XML header.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such ISMRMRD file")
    try:
        f = h5py.File(str(path), "r")
    except Exception as exc:
        raise InputError(f"{path}: not a readable ISMRMRD HDF5 file ({exc})") from None
    images: list[ismrmrd.Image] = []
    labels: list[str] = []
    try:
        name = _resolve_group(f, path, group)
        g = f[name]
        xml = g.get("xml")
        if not isinstance(xml, h5py.Dataset) or xml.shape in ((), (0,)):
            raise InputError(f"{path}: has no ISMRMRD XML header in group '{name}'")
        header = xml[0]
        header = header.decode("utf-8", "replace") if isinstance(header, bytes) else str(header)
        if name != "dataset":
            log.info("%s: reading group '%s'", path, name)
        for sub in _ordered_keys(g):
            obj = g.get(sub)
            if not _is_image_group(obj):
                continue
            try:
                heads = obj["header"][()]
                attrs = obj["attributes"][()] if "attributes" in obj else [b""] * len(heads)
                n = min(len(heads), len(attrs), obj["data"].shape[0])
                if n < len(heads):
                    log.warning("%s: image group '%s' has %d headers but %d data / attribute entries; "
                                "reading %d", path, sub, len(heads), obj["data"].shape[0], n)
                cfg = h5py.get_config()
                saved = cfg.complex_names
                cfg.complex_names = ("real", "imag")  # how ISMRMRD stores complex pixels
                try:
                    data = obj["data"][:n]
                finally:
                    cfg.complex_names = saved
                for k in range(n):
                    im = ismrmrd.Image(heads[k], attrs[k])
                    im.data[:] = data[k]
                    images.append(im)
                    labels.append(f"{sub}")
            except InputError:
                raise
            except Exception as exc:
                raise InputError(f"{path}: image group '{name}/{sub}' is unreadable ({exc})") from None
    finally:
        f.close()
    stamps = [int(im.acquisition_time_stamp) for im in images]
    if any(stamps):
        order = sorted(range(len(images)), key=lambda k: stamps[k])
        images = [images[k] for k in order]
        labels = [labels[k] for k in order]
    check_position_convention(images, labels, where=str(path))
    return header, images
