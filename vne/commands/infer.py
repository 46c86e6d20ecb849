"""``vne infer``: VNE offline, through the same pipeline the Gadgetron gadget runs.

- ISMRMRD HDF5 in (``.h5``): every image is fed to :class:`vne.runtime.pipeline.VNEPipeline` in stream
  order, exactly as the gadget would receive it; the output file holds everything the gadget
  would send back: every input image unchanged plus the VNE series
  (``/dataset/image_<series index>``). ``--group`` names the input's HDF5 group when it is not
  ``/dataset`` and not the only one (:func:`vne.io.mrd.hdf5.read_mrd_file`).
- DICOM folder in: the exams are read with :func:`vne.io.dicom.read_dicom_folder` and fed to
  the same pipeline; the output folder gets one new DICOM series per VNE series (new
  SeriesInstanceUID, ImageType ``DERIVED\\PRIMARY\\VNE``, the same study and frame of
  reference, the T1 map's geometry, SeriesNumber = T1 map's + 1000). The inputs are not copied.

The model defaults to the newest ``models/vne-sim-*.onnx`` (:func:`vne.runtime.model.find_default_model`).
The study cache is off unless ``--cache-dir`` is given (a file holds the whole study).
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from ..errors import InputError
from ..io.atomic import move_into

NAME = "infer"
HELP = "run VNE on an ISMRMRD file (.h5 -> .h5 with the VNE series) or a DICOM folder (-> VNE DICOM series)"
H5_SUFFIXES = (".h5", ".hdf5", ".mrd")


def add_arguments(p) -> None:
    p.add_argument("input", type=Path, help="ISMRMRD HDF5 file or DICOM folder")
    p.add_argument("--out", type=Path, required=True, help="output .h5 file (for .h5 input) or folder (for DICOM input)")
    p.add_argument("--group", default=None, metavar="NAME",
                   help="HDF5 group of an ISMRMRD input file (default: /dataset, else the only top-level group; "
                        "an MRD client output file names it after a timestamp)")
    p.add_argument("--model", type=str, default=None, help="ONNX model (default: newest models/vne-sim-*.onnx, checked "
                                                           "against models/manifest.json)")
    p.add_argument("--model-sha256", default=None, metavar="HEX",
                   help="sha256 the model file must have (a model outside models/manifest.json); a mismatch is an error")
    p.add_argument("--cache-dir", type=str, default="none", help="study cache folder (default: none)")
    p.add_argument("--pixel-type", choices=("float32", "uint16"), default="float32", help="VNE pixel type in the .h5 output")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--property", "-p", action="append", default=[], metavar="NAME=VALUE",
                   help="a gadget property (as in the pipeline XML), e.g. -p series_index=99; repeatable")


def parse_properties(items: list[str]) -> dict[str, str]:
    props = {}
    for it in items:
        if "=" not in it:
            raise InputError(f"--property '{it}' is not NAME=VALUE")
        k, v = it.split("=", 1)
        props[k.strip()] = v.strip()
    return props


def config_from_args(args):
    from ..runtime.config import PipelineConfig

    base = PipelineConfig(model=args.model, model_sha256=getattr(args, "model_sha256", None) or None,
                          cache_dir=args.cache_dir, pixel_type=getattr(args, "pixel_type", "float32"),
                          intra_op_threads=args.threads)
    return PipelineConfig.from_properties(parse_properties(args.property), base=base)


def _summary(problems: list[str]) -> str:
    if not problems:
        return "no problems"
    head = "; ".join(problems[:3])
    return head + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")


def run(args) -> int:
    from ..runtime.model import load_model

    t0 = time.perf_counter()
    src: Path = args.input
    if not src.exists():
        raise InputError(f"{src} does not exist")
    config = config_from_args(args)
    model = load_model(config.model or None, intra_op_threads=config.intra_op_threads, prefer_gpu=config.prefer_gpu,
                       batch_size=config.batch_size, sha256=config.model_sha256)
    if src.is_file():
        if src.suffix.lower() not in H5_SUFFIXES:
            raise InputError(f"{src}: expected an ISMRMRD .h5 file or a DICOM folder")
        n_vne, n_in, problems, where = _infer_h5(src, args.out, config, model, group=getattr(args, "group", None))
    else:
        if getattr(args, "group", None):
            raise InputError(f"--group is for ISMRMRD .h5 input, and {src} is a folder")
        n_vne, n_in, problems, where = _infer_dicom(src, args.out, config, model)
    dt = time.perf_counter() - t0
    if n_vne == 0:  # nothing usable in the input: a user error, as in `vne prepare` and `vne t1map`
        raise InputError(f"no VNE image made from {n_in} input images: {_summary(problems)}")
    print(f"vne infer: {n_vne} VNE image(s) from {n_in} input images with {model.name} {model.version} -> {where} "
          f"in {dt:.1f} s ({_summary(problems)})")
    return 0


def _infer_h5(src: Path, out: Path, config, model, group: str | None = None):
    import ismrmrd

    from ..io.mrd.hdf5 import read_mrd_file, write_mrd_file
    from ..runtime.pipeline import process_stream

    if out.suffix.lower() not in H5_SUFFIXES:
        raise InputError(f"--out {out}: an ISMRMRD input needs an .h5 output file")
    if out.resolve() == src.resolve():
        raise InputError("--out must differ from the input file")
    header, images = read_mrd_file(src, group=group)
    sent, pipeline = process_stream(images, config, header=header, model=model)
    if pipeline.cache_thread is not None:
        pipeline.cache_thread.join()
    write_mrd_file(out, header, [im for im in sent if isinstance(im, ismrmrd.Image)])
    series = sorted({r.series_index for r in pipeline.results})
    return len(pipeline.results), len(images), pipeline.problems, f"{out} (series {', '.join(map(str, series))})" if series else str(out)


def _infer_dicom(src: Path, out: Path, config, model):
    from ..io.dicom import read_dicom_folder, series_folder_name, write_series
    from ..runtime.pipeline import VNEPipeline
    from ..exam.roles import DEFAULT_RULES

    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder")
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise InputError("--out must not be the input folder or inside it")
    rules = DEFAULT_RULES.with_overrides(config.role_overrides) if config.role_overrides else DEFAULT_RULES
    exams = read_dicom_folder(src, rules=rules)
    n_in = sum(len(e.images) for e in exams)
    problems: list[str] = []
    series: dict[int, list] = {}
    for exam in exams:
        p = VNEPipeline(config, model=model)
        results = p.add_images(exam.images)
        if p.cache_thread is not None:
            p.cache_thread.join()
        problems += p.problems
        for r in results:
            series.setdefault(r.series_index, []).append((r, p.to_dicom_image(r)))
    if not series:
        return 0, n_in, problems, str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # one rescale for the whole series (consistent intensities): stored = (vne - intercept) / slope
    from ..runtime.config import DEFAULT_UINT16_OFFSET

    offset = config.output_offset if config.output_offset is not None else DEFAULT_UINT16_OFFSET
    rescale = (1.0 / config.output_scale, -offset / config.output_scale)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    folders = []
    try:
        for index, items in sorted(series.items()):
            items.sort(key=lambda ri: ri[0].image_index)
            r0 = items[0][0]
            folder = tmp_root / series_folder_name(index, r0.description)
            write_series([im for _, im in items], folder, series_number=index, image_type=["DERIVED", "PRIMARY", "VNE"],
                         series_uid=r0.series_uid, series_description=r0.description, rescale=rescale)
            folders.append(folder.name)
        out.mkdir(parents=True, exist_ok=True)
        move_into(tmp_root, out)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    n = sum(len(v) for v in series.values())
    return n, n_in, problems, f"{out} ({', '.join(folders)})"
