"""The ISMRMRD XML header of a stream: a minimal template to write one, parsing, the study key.

The header is the text a stream starts with (``ismrmrdHeader``, ISMRMRD's ``ismrmrd.xsd``). VNE
writes one for simulated and converted exams and reads three facts back from a parsed one: the
study instance UID, the frame of reference UID and the patient ID, which every image of the
stream carries (and by which :mod:`vne.runtime.study_store` finds a study again).
"""
from __future__ import annotations

import html

import ismrmrd

from ...errors import InputError


def header_xml(
    *,
    study_uid: str,
    patient_id: str,
    frame_of_reference_uid: str,
    field_strength_t: float,
    protocol_name: str = "VNE",
    series_description: str = "",
    measurement_id: str = "",
    matrix: tuple[int, int] = (256, 256),
    fov_mm: tuple[float, float, float] = (300.0, 300.0, 8.0),
    vendor: str = "SIEMENS",
) -> str:
    """A minimal valid ISMRMRD XML header for an image-domain stream.

    Args:
        matrix: (nx, ny) of the reconstructed images.
        fov_mm: (fov_x, fov_y, thickness).
    """
    e = html.escape
    nx, ny = matrix
    fx, fy, fz = fov_mm
    return f"""<?xml version="1.0" encoding="utf-8"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:schemaLocation="http://www.ismrm.org/ISMRMRD ismrmrd.xsd">
  <subjectInformation><patientID>{e(patient_id)}</patientID></subjectInformation>
  <studyInformation><studyInstanceUID>{e(study_uid)}</studyInstanceUID></studyInformation>
  <measurementInformation>
    <measurementID>{e(measurement_id or study_uid)}</measurementID>
    <patientPosition>HFS</patientPosition>
    <protocolName>{e(protocol_name)}</protocolName>
    <seriesDescription>{e(series_description or protocol_name)}</seriesDescription>
    <frameOfReferenceUID>{e(frame_of_reference_uid)}</frameOfReferenceUID>
  </measurementInformation>
  <acquisitionSystemInformation>
    <systemVendor>{e(vendor)}</systemVendor>
    <systemFieldStrength_T>{field_strength_t:g}</systemFieldStrength_T>
  </acquisitionSystemInformation>
  <experimentalConditions><H1resonanceFrequency_Hz>{int(round(42577478 * field_strength_t))}</H1resonanceFrequency_Hz></experimentalConditions>
  <encoding>
    <encodedSpace><matrixSize><x>{nx}</x><y>{ny}</y><z>1</z></matrixSize><fieldOfView_mm><x>{fx:g}</x><y>{fy:g}</y><z>{fz:g}</z></fieldOfView_mm></encodedSpace>
    <reconSpace><matrixSize><x>{nx}</x><y>{ny}</y><z>1</z></matrixSize><fieldOfView_mm><x>{fx:g}</x><y>{fy:g}</y><z>{fz:g}</z></fieldOfView_mm></reconSpace>
    <encodingLimits></encodingLimits>
    <trajectory>cartesian</trajectory>
  </encoding>
</ismrmrdHeader>
"""


def study_key(header) -> tuple[str, str, str]:
    """(study UID, frame of reference UID, patient ID) from a parsed ISMRMRD header (or None)."""
    def get(path):
        obj = header
        for p in path:
            obj = getattr(obj, p, None) if obj is not None else None
        return str(obj) if obj is not None else ""

    return (
        get(("studyInformation", "studyInstanceUID")),
        get(("measurementInformation", "frameOfReferenceUID")),
        get(("subjectInformation", "patientID")),
    )


def parse_header(xml: str | bytes):
    """Parse ISMRMRD XML; raises :class:`InputError` on malformed text."""
    try:
        return ismrmrd.xsd.CreateFromDocument(xml)
    except Exception as exc:  # the xsd layer raises a zoo of parser errors
        raise InputError(f"ISMRMRD header is not valid XML: {str(exc).splitlines()[0][:200]}") from None
