"""Evaluation masks for real data: myocardium, remote and blood pool (and lesion) per T1 map, from files.

The evaluation (:mod:`vne.evaluation.analysis`) needs, for every T1 map, three masks on the T1 map's grid:
the **myocardium**, a **remote**-myocardium ROI and an LV **blood-pool** ROI; a **lesion** mask
is optional (it gives the "truth" burden and, when every slice of a patient has one, whether
the patient is lesion-free), and so are the LGE's own contours (``lge_myocardium``,
``lge_blood_pool``, ``lge_remote``, all three or none) for an LGE that is misregistered to the
T1 map. The simulator's ground truth supplies them for simulated exams; for real data they
come as files, read here. See ``docs/masks.md`` for the full description and examples.

Formats
-------
- **NumPy**: ``.npz`` with one named array per mask, or one ``.npy`` per mask. NumPy arrays
  carry no geometry, so each must be ``(rows, columns)`` of the T1 map exactly.
- **NIfTI-1 / NIfTI-2** (``.nii``, ``.nii.gz``), one file per mask, read with nibabel
  (:mod:`vne.io.nifti`). The voxel grid is placed in patient coordinates by the sform
  (when ``sform_code > 0``), else the qform (``qform_code > 0``), as nibabel does; files with
  neither are refused. NIfTI world coordinates are RAS+, DICOM's are LPS+: x and y change sign.
  The mask may be 2D or a 3D stack: the voxel axis closest to the T1 map's normal is the slice
  axis, the slice nearest to the T1 plane that passes :func:`vne.exam.geometry.planes_match` is
  taken and resampled onto the T1 grid nearest-neighbour (:func:`vne.exam.geometry.resample_to_grid`,
  identity when the grids agree). Spatial units other than mm (``xyzt_units``) are converted.
- **DICOM-SEG** (Segmentation Storage, BINARY or FRACTIONAL; any file name, one object per
  study or several), read with highdicom (:mod:`vne.io.dicom_seg`). Segments are found by
  SegmentLabel (then SegmentDescription, then the segmented property type's CodeMeaning),
  compared case- and punctuation-insensitively with configurable names (:data:`DEFAULT_NAMES`). Frames are mapped to a T1 map by the
  ReferencedSOPInstanceUID of their DerivationImageSequence / SourceImageSequence; when no
  frame references the T1 map, by plane position and orientation (same FrameOfReferenceUID,
  the :func:`vne.exam.geometry.planes_match` rule, the nearest plane wins). A segment without a
  frame on a covered T1 map is empty (writers omit empty frames).

A pixel belongs to a mask when its value is at least ``threshold`` (0.5): binary masks may be
bool, 0/1 or 0/255; fractional masks (probabilities or occupancy in 0..1, or a FRACTIONAL SEG
scaled by MaximumFractionalValue) are cut at one half.

Folder layout
-------------
A masks folder ``MASKS`` is searched for every T1 map with these keys:

- ``<uid>``: the T1 map's SOPInstanceUID;
- ``s<k>``: its slice index, ``k`` counting from 0 over the study's distinct T1 maps in
  (SeriesNumber, InstanceNumber) order (:func:`t1_slice_order`; the simulator's ``s0, s1, ...``);
- ``<study>``: the exam's folder name (the first folder under the exams folder, when given),
  its PatientID or its StudyInstanceUID.

and the first of these that exist are the masks (more than one is an error, never a guess)::

    MASKS/<uid>.npz                         arrays myocardium, remote, blood_pool[, lesion]
    MASKS/<uid>_<mask>.npy|.nii|.nii.gz     one file per mask
    MASKS/<study>/<uid or s<k>>.npz         the same, per study folder
    MASKS/<study>/<uid or s<k>>_<mask>.npy|.nii|.nii.gz
    MASKS/<study>.npz                       arrays <uid or s<k>>_<mask>: the simulator's truth layout
    MASKS/**/<any name>                     DICOM-SEG objects, matched by their content

``<mask>`` is ``myocardium``, ``remote``, ``blood_pool``, ``lesion`` (or another of the names,
spaces written as ``_``). A T1 map that none of these cover raises :class:`MasksNotFound`
(an :class:`InputError`: the caller may skip the slice); a file that is found but unusable
(a missing or empty required mask, a wrong shape, a plane that does not match) raises
:class:`InputError` with a one-line reason naming the file.
"""
from __future__ import annotations

import csv
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from ..errors import InputError
from ..exam.data import Geometry, MRImage, Role
from .dicom_seg import LABEL_MAP_SEGMENTATION_STORAGE, SEGMENTATION_STORAGE, DicomSeg, read_dicom_seg, seg_covers, seg_frames_for, segment_on_grid
from .nifti import nifti_on_grid, read_nifti

log = logging.getLogger(__name__)

REQUIRED = ("myocardium", "remote", "blood_pool")
LGE_CONTOURS = ("lge_myocardium", "lge_blood_pool", "lge_remote")
OPTIONAL = ("lesion",) + LGE_CONTOURS
ROLES = REQUIRED + OPTIONAL

#: Accepted names per mask (array names, file-name suffixes, DICOM-SEG segment labels). They are
#: compared after :func:`normalise_name` (lower case, punctuation and ``_`` as one space).
DEFAULT_NAMES: dict[str, tuple[str, ...]] = {
    "myocardium": ("myocardium", "lv myocardium", "left ventricle myocardium", "left ventricular myocardium", "myo"),
    "remote": ("remote", "remote myocardium", "remote roi"),
    "blood_pool": ("blood pool", "lv blood pool", "left ventricle blood pool", "lv cavity", "left ventricle cavity",
                   "blood pool roi", "bloodpool", "blood"),
    "lesion": ("lesion", "scar"),  # not "fibrosis": the simulator truth has a fibrosis fraction map beside its lesion mask
    "lge_myocardium": ("lge myocardium",),
    "lge_blood_pool": ("lge blood pool",),
    "lge_remote": ("lge remote",),
}
DEFAULT_THRESHOLD = 0.5
_NIFTI_SUFFIXES = (".nii.gz", ".nii")
_MASK_FILE_SUFFIXES = (".npy",) + _NIFTI_SUFFIXES
_NOT_DICOM_SUFFIXES = (".npz", ".npy", ".nii", ".gz", ".csv", ".json", ".txt", ".md", ".png", ".jpg", ".yaml", ".yml")


class MasksNotFound(InputError):
    """No masks at all for a T1 map (the slice can be skipped); bad masks raise plain InputError."""


def normalise_name(name: str) -> str:
    """``"LV_Blood-Pool "`` -> ``"lv blood pool"``."""
    return re.sub(r"[^a-z0-9]+", " ", str(name).lower()).strip()


def mask_names(names: Mapping[str, Sequence[str]] | None = None) -> dict[str, tuple[str, ...]]:
    """:data:`DEFAULT_NAMES` with ``names`` replacing the lists of the masks it names (normalised).

    A given name wins over a default one: ``{"remote": ["myo"]}`` also takes "myo" from the
    myocardium's defaults.

    Raises:
        InputError: an unknown mask, an empty list, or one name given for two masks.
    """
    given: dict[str, tuple[str, ...]] = {}
    owner: dict[str, str] = {}
    for role, aliases in (names or {}).items():
        if role not in ROLES:
            raise InputError(f"unknown mask '{role}' in the mask names (known: {', '.join(ROLES)})")
        aliases = [aliases] if isinstance(aliases, str) else list(aliases)
        norm = tuple(dict.fromkeys(normalise_name(a) for a in aliases if normalise_name(a)))
        if not norm:
            raise InputError(f"no names given for the '{role}' mask")
        for a in norm:
            if owner.setdefault(a, role) != role:
                raise InputError(f"mask name '{a}' is given for both '{owner[a]}' and '{role}'")
        given[role] = norm
    out = {}
    for role, aliases in DEFAULT_NAMES.items():
        out[role] = given.get(role) or tuple(a for a in dict.fromkeys(normalise_name(x) for x in aliases) if a not in owner)
    return out


def _role_of(name: str, names: dict[str, tuple[str, ...]]) -> str | None:
    n = normalise_name(name)
    for role, aliases in names.items():
        if n in aliases:
            return role
    return None


@dataclass
class SliceMasks:
    """The masks of one T1 map, (H, W) bool on its grid.

    Attributes:
        lesion: None when the source has no lesion mask.
        lge_myocardium, lge_blood_pool, lge_remote: the LGE's own contours, or None.
        source: where they came from (for logs and messages).
    """

    myocardium: np.ndarray
    remote: np.ndarray
    blood_pool: np.ndarray
    lesion: np.ndarray | None = None
    lge_myocardium: np.ndarray | None = None
    lge_blood_pool: np.ndarray | None = None
    lge_remote: np.ndarray | None = None
    source: str = ""


def masks_from_values(values: Mapping[str, np.ndarray], shape: tuple[int, ...], source: str,
                      threshold: float = DEFAULT_THRESHOLD) -> SliceMasks:
    """:class:`SliceMasks` from role -> (H, W) values already on the T1 grid.

    Raises:
        InputError: a required mask missing or empty, a wrong shape, non-finite values, or an
            incomplete set of LGE contours.
    """
    missing = [r for r in REQUIRED if r not in values]
    if missing:
        have = ", ".join(sorted(values)) or "none"
        raise InputError(f"{source}: no {' / '.join(missing)} mask (found: {have})")
    lge = [r for r in LGE_CONTOURS if r in values]
    if lge and len(lge) != len(LGE_CONTOURS):
        raise InputError(f"{source}: the LGE contours need all of {', '.join(LGE_CONTOURS)} (found: {', '.join(lge)})")
    out: dict[str, np.ndarray] = {}
    for role, v in values.items():
        a = np.asarray(v)
        if a.shape != tuple(shape):
            hint = " (transposed?)" if a.shape == tuple(shape)[::-1] else ""
            raise InputError(f"{source}: {role} mask is {a.shape}, the T1 map is {tuple(shape)}{hint}")
        if a.dtype == bool:
            m = a.copy()
        else:
            if a.dtype.kind not in "iuf":
                raise InputError(f"{source}: {role} mask has unsupported type {a.dtype}")
            if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
                raise InputError(f"{source}: {role} mask contains NaN or inf")
            m = a >= threshold
        out[role] = m
    for role in REQUIRED + LGE_CONTOURS:
        if role in out and not out[role].any():
            raise InputError(f"{source}: empty {role} mask")
    if (out["remote"] & ~out["myocardium"]).sum() > 0.5 * out["remote"].sum():
        log.warning("%s: most of the remote ROI lies outside the myocardium mask", source)
    return SliceMasks(**out, source=source)


def _arrays_by_role(arrays: Mapping[str, np.ndarray], names, source: str, prefix: str = "") -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    from_name: dict[str, str] = {}
    for key in arrays:
        if prefix:
            if not key.startswith(prefix):
                continue
            name = key[len(prefix):]
        else:
            name = key
        role = _role_of(name, names)
        if role is None:
            continue
        if role in out:
            raise InputError(f"{source}: arrays '{from_name[role]}' and '{key}' are both a {role} mask")
        out[role], from_name[role] = arrays[key], key
    return out


# ----------------------------------------------------------------------------- DICOM-SEG segments


def _assign_segments(segs: list[DicomSeg], names) -> tuple[dict[str, tuple[DicomSeg, int]], str]:
    """Role -> (seg, segment number): by SegmentLabel first; roles still unmatched then by
    SegmentDescription, then by the property type's CodeMeaning (segments not yet taken)."""
    found: dict[str, list[tuple[DicomSeg, int]]] = {}
    taken: set[tuple[int, int]] = set()
    for attr in ("label", "description", "property_type"):
        new: dict[str, list[tuple[DicomSeg, int]]] = {}
        for seg in segs:
            for n, s in seg.segments.items():
                text = getattr(s, attr)
                role = _role_of(text, names) if text and (id(seg), n) not in taken else None
                if role is not None and role not in found:
                    new.setdefault(role, []).append((seg, n))
        for role, hits in new.items():
            found[role] = hits
            taken.update((id(seg), n) for seg, n in hits)
    out = {}
    for role in ROLES:
        hits = found.get(role, [])
        if len(hits) > 1:
            labels = ", ".join(f"'{seg.segments[n].label}' ({seg.path.name} #{n})" for seg, n in hits)
            raise InputError(f"DICOM-SEG: {len(hits)} segments could be the {role} mask: {labels}")
        if hits:
            out[role] = hits[0]
    available = "; ".join(f"{seg.path.name}: " + ", ".join(f"'{s.label}'" for s in seg.segments.values()) for seg in segs)
    return out, available


def seg_masks(segs: Sequence[DicomSeg], t1: MRImage, names=None, threshold: float = DEFAULT_THRESHOLD) -> SliceMasks:
    """The masks of one T1 map from one or more DICOM-SEG objects of its study.

    Raises:
        MasksNotFound: none of them references the T1 map or has a frame on it (a SEG that
            references it has an empty segment where it has no frame).
        InputError: a required segment is missing or empty, or a referencing frame is off the plane.
    """
    names = mask_names(names)
    target = t1.geometry
    on = [(seg, seg_frames_for(seg, t1)) for seg in segs if seg_covers(seg, t1)]
    if not on:
        raise MasksNotFound(f"no DICOM-SEG frame lies on T1 map {t1.meta.get('SOPInstanceUID', t1.source)}")
    used = [seg for seg, _ in on]
    assignment, available = _assign_segments(used, names)
    src = ", ".join(str(seg.path) for seg in used)
    missing = [r for r in REQUIRED if r not in assignment]
    if missing:
        raise InputError(f"{src}: no segment labelled as {' / '.join(missing)} (segments: {available}); "
                         "pass the segment names that the file uses")
    frames_of = {id(seg): fr for seg, fr in on}
    values = {role: segment_on_grid(seg, frames_of[id(seg)], number, target) for role, (seg, number) in assignment.items()}
    return masks_from_values(values, target.shape, src, threshold)


# ----------------------------------------------------------------------------- folders


def t1_slice_order(images: Iterable[MRImage]) -> list[MRImage]:
    """The distinct T1 maps of one exam in slice-index order (``s0, s1, ...``).

    Order: (SeriesNumber, SeriesInstanceUID, InstanceNumber, file) as :func:`vne.io.dicom.read_dicom_folder`
    sorts an exam; a repeated T1 map (same series and position) counts once, as in
    :func:`vne.prepare.slices.build_slices`.
    """
    def num(im, key):
        try:
            return int(float(im.meta.get(key, 0)))
        except (TypeError, ValueError):
            return 0

    t1s = sorted((im for im in images if im.role == Role.T1_MAP),
                 key=lambda im: (num(im, "SeriesNumber"), im.series, num(im, "InstanceNumber"), im.source))
    out, seen = [], set()
    for im in t1s:
        k = (im.series, tuple(np.round(im.geometry.position_mm, 2)))
        if k not in seen:
            seen.add(k)
            out.append(im)
    return out


def _mask_file_role(stem: str, tokens: list[tuple[str, str]]) -> tuple[str, str] | None:
    low = stem.lower()
    for token, role in tokens:
        if low.endswith("_" + token):
            return stem[: -len(token) - 1], role
    return None


def _suffix(name: str) -> str:
    low = name.lower()
    for s in (".nii.gz", ".npz", ".npy", ".nii"):
        if low.endswith(s):
            return s
    return ""


class MaskStore:
    """A masks folder (or one masks file), indexed once, answering :meth:`load` per T1 map.

    Args:
        root: a folder laid out as in the module docstring, or one ``.npz`` or DICOM-SEG file.
        names: mask -> accepted names, replacing :data:`DEFAULT_NAMES` for the masks given.
        threshold: a pixel is in a mask when its value is at least this.

    Raises:
        InputError: ``root`` does not exist.
    """

    def __init__(self, root, names: Mapping[str, Sequence[str]] | None = None, threshold: float = DEFAULT_THRESHOLD) -> None:
        self.root = Path(root)
        if not self.root.exists():
            raise InputError(f"masks {self.root} do not exist")
        self.names = mask_names(names)
        self.threshold = float(threshold)
        tokens = [(a.replace(" ", "_"), role) for role, aliases in self.names.items() for a in aliases]
        self._tokens = sorted(tokens, key=lambda t: -len(t[0]))
        self.npz: dict[str, Path] = {}                      # "<rel stem>" -> file
        self.mask_files: dict[str, dict[str, Path]] = {}     # "<rel stem>" -> role -> file
        self.segs: list[DicomSeg] = []
        self._npz_keys: dict[Path, list[str]] = {}
        self.single_file = self.root.is_file()
        files = [self.root] if self.single_file else self._walk()
        for f in files:
            self._index(f)
        log.info("masks %s: %d .npz, %d per-mask stems, %d DICOM-SEG", self.root, len(self.npz), len(self.mask_files), len(self.segs))

    def _walk(self) -> list[Path]:
        out: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            out.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
        return out

    def _rel(self, f: Path, suffix: str) -> str:
        rel = f.name if self.single_file else f.relative_to(self.root).as_posix()
        return rel[: len(rel) - len(suffix)]

    def _index(self, f: Path) -> None:
        suffix = _suffix(f.name)
        if suffix == ".npz":
            self.npz[self._rel(f, suffix)] = f
            return
        if suffix in _MASK_FILE_SUFFIXES:
            hit = _mask_file_role(self._rel(f, suffix), self._tokens)
            if hit is None:
                log.debug("masks: %s is not named <key>_<mask>%s; ignored", f, suffix)
                return
            stem, role = hit
            files = self.mask_files.setdefault(stem, {})
            if role in files:
                raise InputError(f"two {role} masks for '{stem}': {files[role]} and {f}")
            files[role] = f
            return
        if f.name.lower().endswith(_NOT_DICOM_SUFFIXES):
            return
        import pydicom

        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # not DICOM (or unreadable): not a mask file
            log.debug("masks: %s is not a DICOM file; ignored", f)
            return
        sop_class = str(ds.get("SOPClassUID", ""))
        if sop_class == SEGMENTATION_STORAGE:
            self.segs.append(read_dicom_seg(f, ds))
        elif sop_class == LABEL_MAP_SEGMENTATION_STORAGE:
            raise InputError(f"{f}: a label-map segmentation cannot hold overlapping masks (remote lies inside the "
                             "myocardium); save it as a BINARY or FRACTIONAL segmentation")
        else:
            log.debug("masks: %s is DICOM but not a segmentation; ignored", f)

    def _npz_arrays(self, path: Path) -> list[str]:
        if path not in self._npz_keys:
            try:
                with np.load(path, allow_pickle=False) as z:
                    self._npz_keys[path] = list(z.files)
            except Exception as exc:
                raise InputError(f"{path}: unreadable .npz ({exc.__class__.__name__}: {exc})") from None
        return self._npz_keys[path]

    def _load_npz(self, path: Path, shape, prefix: str = "") -> SliceMasks:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k.startswith(prefix)}
        by_role = _arrays_by_role(arrays, self.names, str(path), prefix)
        src = f"{path}[{prefix}*]" if prefix else str(path)
        return masks_from_values(by_role, shape, src, self.threshold)

    def _load_files(self, files: dict[str, Path], target: Geometry, stem: str) -> SliceMasks:
        values = {}
        for role, f in files.items():
            if f.name.lower().endswith(".npy"):
                try:
                    values[role] = np.load(f, allow_pickle=False)
                except Exception as exc:
                    raise InputError(f"{f}: unreadable .npy ({exc.__class__.__name__}: {exc})") from None
            else:
                values[role] = nifti_on_grid(read_nifti(f), target)
        return masks_from_values(values, target.shape, f"{self.root / stem}_*", self.threshold)

    def sources(self, t1: MRImage, slice_index: int | None = None, study_keys: Sequence[str] = ()) -> list[tuple]:
        """Every place that holds masks for this T1 map: (kind, where, detail) tuples."""
        sop = str(t1.meta.get("SOPInstanceUID", "") or "")
        slices = [k for k in (sop, f"s{slice_index}" if slice_index is not None else "") if k]
        studies = [k for k in dict.fromkeys(str(s) for s in study_keys if s)]
        found: list[tuple] = []
        if self.single_file and self.npz:  # one .npz: named arrays, or arrays prefixed <uid or s<k>>_
            path = next(iter(self.npz.values()))
            keys = self._npz_arrays(path)
            if any(_role_of(k, self.names) for k in keys):
                found.append(("npz", path, ""))
            for sk in slices:
                if any(k.startswith(sk + "_") and _role_of(k[len(sk) + 1:], self.names) for k in keys):
                    found.append(("npz", path, sk + "_"))
            return found
        stems = ([sop] if sop else []) + [f"{st}/{sk}" for st in studies for sk in slices]
        for stem in stems:
            if stem in self.npz:
                found.append(("npz", self.npz[stem], ""))
            if stem in self.mask_files:
                found.append(("files", stem, ""))
        for st in studies:
            study_npz = self.npz.get(st)
            if study_npz is None:
                continue
            keys = self._npz_arrays(study_npz)
            for sk in slices:
                if any(k.startswith(sk + "_") and _role_of(k[len(sk) + 1:], self.names) for k in keys):
                    found.append(("npz", study_npz, sk + "_"))
        segs = [seg for seg in self.segs if seg_covers(seg, t1)]
        if segs:
            found.append(("seg", tuple(segs), ""))
        return found

    def load(self, t1: MRImage, slice_index: int | None = None, study_keys: Sequence[str] = ()) -> SliceMasks:
        """The masks of one T1 map on its grid.

        Args:
            t1: the T1 map (its SOPInstanceUID, geometry and frame of reference are used).
            slice_index: its index in the study (:func:`t1_slice_order`), for ``s<k>`` names.
            study_keys: names of its study folder / study .npz (exam folder, PatientID, StudyInstanceUID).

        Raises:
            MasksNotFound: nothing in the masks covers this T1 map.
            InputError: the masks found are unusable, or found in more than one place.
        """
        if t1.pixels is not None and np.shape(t1.pixels) != tuple(t1.geometry.shape):
            raise InputError(f"T1 map {t1.source}: pixels {np.shape(t1.pixels)} do not match its geometry")
        found = self.sources(t1, slice_index, study_keys)
        sop = t1.meta.get("SOPInstanceUID", "") or t1.source
        if not found:
            looked = f"SOPInstanceUID {sop}" + (f", s{slice_index}" if slice_index is not None else "")
            if study_keys:
                looked += f" under {' / '.join(str(s) for s in study_keys if s)}"
            raise MasksNotFound(f"no masks for T1 map {looked} in {self.root}")
        if len(found) > 1:
            where = "; ".join(self._describe(s) for s in found)
            raise InputError(f"masks for T1 map {sop} found in {len(found)} places ({where}); keep one")
        kind, where, prefix = found[0]
        if kind == "npz":
            m = self._load_npz(where, t1.geometry.shape, prefix)
        elif kind == "files":
            m = self._load_files(self.mask_files[where], t1.geometry, where)
        else:
            m = seg_masks(list(where), t1, self.names, self.threshold)
        log.debug("masks for %s from %s", sop, m.source)
        return m

    def _describe(self, s) -> str:
        kind, where, prefix = s
        if kind == "seg":
            return ", ".join(str(seg.path) for seg in where)
        if kind == "files":
            return f"{self.root / where}_*"
        return f"{where}[{prefix}*]" if prefix else str(where)


def load_masks(masks, t1: MRImage, *, slice_index: int | None = None, study_keys: Sequence[str] = (),
               names: Mapping[str, Sequence[str]] | None = None, threshold: float = DEFAULT_THRESHOLD) -> SliceMasks:
    """The masks of one T1 map from a masks folder or file (a one-off :class:`MaskStore`)."""
    return MaskStore(masks, names, threshold).load(t1, slice_index=slice_index, study_keys=study_keys)


_TRUE = {"1", "true", "yes", "y", "t"}
_FALSE = {"0", "false", "no", "n", "f"}


def read_lesion_free_csv(path) -> dict[str, bool]:
    """PatientID -> lesion-free, from a CSV with a header naming ``patient_id`` (or
    ``PatientID``) and ``lesion_free`` columns; values 1/0, true/false or yes/no.

    Raises:
        InputError: a missing column, an unreadable value or a patient listed twice.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise InputError(f"{path}: unreadable ({exc})") from None
    rows = list(csv.DictReader(text.splitlines()))
    if not rows:
        raise InputError(f"{path}: no rows (need a header with patient_id,lesion_free)")
    cols = {normalise_name(c): c for c in rows[0] if c is not None}
    pid = cols.get("patient id") or cols.get("patientid")
    free = cols.get("lesion free")
    if not pid or not free:
        raise InputError(f"{path}: need columns patient_id and lesion_free (has: {', '.join(rows[0])})")
    out: dict[str, bool] = {}
    for n, row in enumerate(rows, start=2):
        p, v = (row.get(pid) or "").strip(), (row.get(free) or "").strip().lower()
        if not p:
            continue
        if v not in _TRUE | _FALSE:
            raise InputError(f"{path}:{n}: lesion_free '{row.get(free)}' is not 1/0, true/false or yes/no")
        if p in out:
            raise InputError(f"{path}:{n}: patient {p} is listed twice")
        out[p] = v in _TRUE
    return out
