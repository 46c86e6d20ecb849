"""ISMRMRD images, headers and HDF5 files <-> :class:`vne.exam.data.MRImage`.

One idea per module; import a name from the module that holds it:

- :mod:`~vne.io.mrd.header`: the XML header (``header_xml``, ``parse_header``, ``study_key``);
- :mod:`~vne.io.mrd.image`: one ``ismrmrd.Image`` <-> one ``MRImage`` (``to_mrd``, ``from_mrd``,
  ``geometry_of``, ``meta_dict``) and the ISMRMRD conventions VNE follows;
- :mod:`~vne.io.mrd.dicom2mrd`: python-ismrmrd-server's dicom2mrd.py images (``DicomJson`` meta);
- :mod:`~vne.io.mrd.position_convention`: ``position`` stored as the first pixel, not the centre;
- :mod:`~vne.io.mrd.hdf5`: ISMRMRD HDF5 files (``read_mrd_file``, ``write_mrd_file``).

The names below are also importable from ``vne.io.mrd`` itself, as they were when this was one
module (docs/roles.md documents ``vne.io.mrd.read_mrd_file`` and ``vne.io.mrd.from_mrd``).
"""
from .dicom2mrd import DICOM_JSON_KEY, DICOM_JSON_META, DICOM_TAGS, dicom_json, geometry_from_dicom_json
from .hdf5 import read_mrd_file, write_mrd_file
from .header import header_xml, parse_header, study_key
from .image import EMITTABLE_DTYPES, PHYSIO_TICK_MS, from_mrd, geometry_of, meta_dict, to_mrd
from .position_convention import (
    FIRST_PIXEL_AGREEMENT_RATIO,
    FIRST_PIXEL_MIN_GAIN_MM,
    FIRST_PIXEL_MIN_SHARE,
    FIRST_PIXEL_WARNING,
    check_position_convention,
    position_convention_findings,
)

__all__ = [
    "DICOM_JSON_KEY", "DICOM_JSON_META", "DICOM_TAGS", "EMITTABLE_DTYPES", "FIRST_PIXEL_AGREEMENT_RATIO",
    "FIRST_PIXEL_MIN_GAIN_MM", "FIRST_PIXEL_MIN_SHARE", "FIRST_PIXEL_WARNING", "PHYSIO_TICK_MS",
    "check_position_convention", "dicom_json", "from_mrd", "geometry_from_dicom_json", "geometry_of",
    "header_xml", "meta_dict", "parse_header", "position_convention_findings", "read_mrd_file", "study_key",
    "to_mrd", "write_mrd_file",
]
