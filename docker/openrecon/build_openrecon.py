#!/usr/bin/env python3
"""Validate VNE's OpenRecon label and build the OpenRecon deliverable (docker/README.md, "OpenRecon").

    python docker/openrecon/build_openrecon.py                     # validate, print the label, build the zip
    python docker/openrecon/build_openrecon.py --print-label       # only the base64 label (for docker build)
    python docker/openrecon/build_openrecon.py --image-tar T.tar   # the scanner zip, with a saved image
    python docker/openrecon/build_openrecon.py --build-image       # docker build + docker save + scanner zip

Steps:

1. ``label.json`` is validated against ``schema-1.1.0.json`` (``--schema`` to use another file,
   e.g. the official one from the OpenRecon developer package) with the ``jsonschema`` package
   when it is installed, else with :func:`check_schema`, a small draft-07 checker for the keywords
   these schemas use. Then VNE's own checks (:func:`check_vne`): the version is the package's,
   the port is the one the Dockerfile serves on, every parameter is the ``config`` choice
   (offering ``vne``) or a VNE property a client may set, and every default is a valid value.
2. The label is printed as base64 of its JSON: the value of the Docker image label
   ``com.siemens-healthineers.magneticresonance.openrecon.metadata:1.1.0``
   (``docker build --build-arg OPENRECON_LABEL=...``; ``docker/openrecon/Dockerfile``).
3. The deliverable zip ``OpenRecon_<vendor>_<name>_V<version>.zip`` goes to ``--out``
   (default ``dist/openrecon``), in one of two layouts:

   - without an image tar (no Docker engine here), the *staging* zip: ``<base>.pdf`` (the
     application guide, ``guide.md`` rendered as a plain-text PDF), ``<base>.json`` (the label)
     and ``manifest.json`` (files, sha256, the image name, the label, and how to add the image);
   - with ``--image-tar`` (or ``--build-image`` on a machine with Docker), the *scanner* zip:
     exactly ``<base>.tar`` (``docker save`` of the image) and ``<base>.pdf``, the layout public
     OpenRecon build scripts produce; the label and the manifest are written next to the zip.

Only the Python standard library is needed (plus ``vne`` from this repository for the checks).
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
LABEL = HERE / "label.json"
SCHEMA = HERE / "schema-1.1.0.json"
GUIDE = HERE / "guide.md"
DOCKERFILE = HERE / "Dockerfile"
LABEL_KEY = "com.siemens-healthineers.magneticresonance.openrecon.metadata:1.1.0"
DEFAULT_OUT = REPO / "dist" / "openrecon"
CONFIG_PARAMETER = "config"
VNE_CONFIG = "vne"


# ---------------------------------------------------------------------------- schema validation
class _Checker:
    """Draft-07 validation for the keywords OpenRecon schemas use: type, enum, const, required,
    properties, additionalProperties, items, minItems, maxItems, uniqueItems, minimum, maximum,
    multipleOf, minLength, maxLength, pattern, oneOf, anyOf, allOf, $ref (local JSON pointers,
    ``#/definitions/..`` or ``#/properties/parameters/$defs/..``). Unknown keywords are ignored,
    as the JSON Schema specification asks."""

    TYPES = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "boolean": lambda v: isinstance(v, bool),
        "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool))
        or (isinstance(v, float) and v.is_integer()),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "null": lambda v: v is None,
    }

    def __init__(self, root: dict) -> None:
        self.root = root

    def resolve(self, ref: str) -> dict:
        if not ref.startswith("#"):
            raise ValueError(f"only local $ref is supported, got {ref!r}")
        node = self.root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            node = node[int(part)] if isinstance(node, list) else node[part]
        return node

    def errors(self, value, schema, path: str = "$") -> list[str]:
        if schema is True or schema == {}:
            return []
        if schema is False:
            return [f"{path}: no value is allowed here"]
        out: list[str] = []
        if "$ref" in schema:
            return self.errors(value, self.resolve(schema["$ref"]), path)  # draft-07: $ref ignores siblings
        t = schema.get("type")
        if t is not None:
            types = t if isinstance(t, list) else [t]
            if not any(self.TYPES[x](value) for x in types):
                return [f"{path}: {json.dumps(value)[:60]} is not of type {' or '.join(types)}"]
        if "const" in schema and not _equal(value, schema["const"]):
            out.append(f"{path}: must be {json.dumps(schema['const'])}")
        if "enum" in schema and not any(_equal(value, e) for e in schema["enum"]):
            out.append(f"{path}: {json.dumps(value)[:60]} is not one of {json.dumps(schema['enum'])}")
        if isinstance(value, dict):
            for name in schema.get("required", []):
                if name not in value:
                    out.append(f"{path}: '{name}' is a required property")
            props = schema.get("properties", {})
            for k, v in value.items():
                if k in props:
                    out += self.errors(v, props[k], f"{path}.{k}")
                elif schema.get("additionalProperties") is False:
                    out.append(f"{path}: additional property '{k}' is not allowed")
                elif isinstance(schema.get("additionalProperties"), dict):
                    out += self.errors(v, schema["additionalProperties"], f"{path}.{k}")
        if isinstance(value, list):
            if "minItems" in schema and len(value) < schema["minItems"]:
                out.append(f"{path}: {len(value)} item(s), fewer than {schema['minItems']}")
            if "maxItems" in schema and len(value) > schema["maxItems"]:
                out.append(f"{path}: {len(value)} items, more than {schema['maxItems']}")
            if schema.get("uniqueItems"):
                seen = [json.dumps(v, sort_keys=True) for v in value]
                if len(set(seen)) != len(seen):
                    out.append(f"{path}: items are not unique")
            items = schema.get("items")
            if isinstance(items, dict):
                for i, v in enumerate(value):
                    out += self.errors(v, items, f"{path}[{i}]")
        if self.TYPES["number"](value):
            if "minimum" in schema and value < schema["minimum"]:
                out.append(f"{path}: {value} is less than the minimum {schema['minimum']}")
            if "maximum" in schema and value > schema["maximum"]:
                out.append(f"{path}: {value} is more than the maximum {schema['maximum']}")
            if "multipleOf" in schema and not _multiple_of(value, schema["multipleOf"]):
                out.append(f"{path}: {value} is not a multiple of {schema['multipleOf']}")
        if isinstance(value, str):
            if "minLength" in schema and len(value) < schema["minLength"]:
                out.append(f"{path}: '{value}' is shorter than {schema['minLength']}")
            if "maxLength" in schema and len(value) > schema["maxLength"]:
                out.append(f"{path}: '{value[:40]}' is longer than {schema['maxLength']}")
            if "pattern" in schema and not re.search(schema["pattern"], value):
                out.append(f"{path}: '{value[:60]}' does not match {schema['pattern']}")
        for sub in schema.get("allOf", []):
            out += self.errors(value, sub, path)
        if "anyOf" in schema and not any(not self.errors(value, s, path) for s in schema["anyOf"]):
            out.append(f"{path}: matches none of anyOf")
        if "oneOf" in schema:
            results = [self.errors(value, s, path) for s in schema["oneOf"]]
            n_ok = sum(not r for r in results)
            if n_ok != 1:
                detail = "" if n_ok else "; closest: " + min(results, key=len)[0]
                out.append(f"{path}: matches {n_ok} of the oneOf alternatives, not exactly 1{detail}")
        return out


def _equal(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def _multiple_of(value, step) -> bool:
    """As the ``jsonschema`` package decides it, so both checkers agree (a float step: the
    quotient must be a whole number in floating point)."""
    if isinstance(step, float):
        q = value / step
        return math.isfinite(q) and int(q) == q
    return value % step == 0


def check_schema(instance, schema: dict) -> list[str]:
    """Errors of ``instance`` against ``schema`` with the built-in checker ([] when valid)."""
    return _Checker(schema).errors(instance, schema)


def validate(label: dict, schema: dict) -> tuple[list[str], str]:
    """(errors, validator used): ``jsonschema``'s Draft7Validator when installed, else the
    built-in :func:`check_schema`."""
    try:
        import jsonschema  # noqa: F401  (optional)
    except ImportError:
        return check_schema(label, schema), "built-in checker (jsonschema is not installed)"
    v = jsonschema.Draft7Validator(schema)
    errs = [f"$.{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(label)]
    return errs, f"jsonschema {getattr(jsonschema, '__version__', '')} Draft7Validator"


# ---------------------------------------------------------------------------- VNE's own checks
def _import_vne():
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import vne
    from gadgets import vne_mrd
    from vne.runtime import config as runtime_config

    return vne, runtime_config, vne_mrd


def dockerfile_port(path: Path = DOCKERFILE) -> int | None:
    """The port of ``vne serve`` in the Dockerfile's CMD."""
    m = re.search(r'"--port",\s*"(\d+)"', path.read_text()) if path.is_file() else None
    return int(m.group(1)) if m else None


def check_vne(label: dict) -> list[str]:
    """Checks the schema cannot make: the label describes this VNE and this container."""
    vne, runtime_config, vne_mrd = _import_vne()
    errs = []
    g, r = label.get("general", {}), label.get("reconstruction", {})
    if g.get("version") != vne.__version__:
        errs.append(f"general.version {g.get('version')!r} is not the package version {vne.__version__!r}")
    port = dockerfile_port()
    if r.get("port") != port:
        errs.append(f"reconstruction.port {r.get('port')} is not the port the Dockerfile serves on ({port})")
    settable = {vne_mrd.openrecon_id(p): p for p in vne_mrd.client_settable_properties()}
    props = {}
    params = label.get("parameters", [])
    ids = [p.get("id") for p in params]
    if CONFIG_PARAMETER not in ids:
        errs.append("parameters: no 'config' parameter (the scanner must send config 'vne')")
    for p in params:
        pid = p.get("id")
        if pid == CONFIG_PARAMETER:
            values = [v.get("id") for v in p.get("values", [])]
            if p.get("type") != "choice" or VNE_CONFIG not in values or p.get("default") != VNE_CONFIG:
                errs.append("parameters: 'config' must be a choice offering and defaulting to 'vne'")
            continue
        if pid not in settable:
            errs.append(f"parameters: '{pid}' is not a VNE property a client may set (known: {', '.join(settable)})")
            continue
        prop = settable[pid]
        if p.get("type") == "choice":
            for v in p.get("values", []):
                try:
                    runtime_config.PipelineConfig.from_properties({prop: v.get("id")}, trusted=False)
                except Exception as exc:
                    errs.append(f"parameters: '{pid}' value {v.get('id')!r} is refused by VNE ({exc})")
            if p.get("default") not in [v.get("id") for v in p.get("values", [])]:
                errs.append(f"parameters: '{pid}' default {p.get('default')!r} is not one of its values")
        default = p.get("default")
        props[prop] = ("true" if default else "false") if isinstance(default, bool) else ("" if default is None else str(default))
    try:
        runtime_config.PipelineConfig.from_properties(props, trusted=False)
    except Exception as exc:
        errs.append(f"parameters: the defaults together are refused by VNE ({exc})")
    return errs


# ---------------------------------------------------------------------------- label, names
def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def label_base64(label: dict) -> str:
    """The Docker label value: base64 of the label's JSON (UTF-8), one line."""
    return base64.b64encode(json.dumps(label, indent=2).encode("utf-8")).decode("ascii")


def label_from_base64(text: str) -> dict:
    return json.loads(base64.b64decode(text.encode("ascii"), validate=True).decode("utf-8"))


def dockerfile_label_line(label: dict) -> str:
    return f'LABEL "{LABEL_KEY}"="{label_base64(label)}"'


def base_name(label: dict) -> str:
    """``OpenRecon_<vendor>_<name>_V<version>``: the names of the zip, the tar and the PDF."""
    g = label["general"]
    return f"OpenRecon_{g['vendor']}_{g['name']['en']}_V{g['version']}"


def image_name(label: dict) -> str:
    """The Docker image name:tag (lower case, as Docker requires)."""
    g = label["general"]
    return f"openrecon_{g['vendor']}_{g['name']['en']}:v{g['version']}".lower()


def docker_commands(label: dict, out_dir: Path) -> list[list[str]]:
    """The ``docker build`` and ``docker save`` commands (run from the repository root)."""
    tar = Path(out_dir) / f"{base_name(label)}.tar"
    return [
        ["docker", "build", "--platform", "linux/amd64", "-f", str(DOCKERFILE.relative_to(REPO)),
         "--build-arg", f"OPENRECON_LABEL={label_base64(label)}", "-t", image_name(label), "."],
        ["docker", "save", "-o", str(tar), image_name(label)],
    ]


# ---------------------------------------------------------------------------- the guide as a PDF
def _pdf_text(s: str) -> str:
    s = s.encode("latin-1", "replace").decode("latin-1")
    return s.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def text_pdf(text: str, *, width: int = 96, lines_per_page: int = 64) -> bytes:
    """A valid PDF 1.4 of ``text`` in 9 pt Courier, wrapped at ``width`` characters (no images,
    no fonts embedded: the standard 14 fonts need none)."""
    import textwrap

    lines: list[str] = []
    for raw in text.splitlines() or [""]:
        wrapped = textwrap.wrap(raw, width, replace_whitespace=False, drop_whitespace=False,
                                subsequent_indent="  ") if raw.strip() else [""]
        lines += wrapped or [""]
    pages = [lines[i:i + lines_per_page] for i in range(0, len(lines), lines_per_page)] or [[""]]
    objs: list[bytes] = []
    n_pages = len(pages)
    font_id = 3 + 2 * n_pages
    kids = " ".join(f"{3 + 2 * k} 0 R" for k in range(n_pages))
    objs.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objs.append(f"<< /Type /Pages /Kids [{kids}] /Count {n_pages} >>".encode())
    for k, page in enumerate(pages):
        body = ["BT", "/F1 9 Tf", "11 TL", "40 800 Td"]
        body += [f"({_pdf_text(line)}) Tj T*" for line in page]
        body.append("ET")
        stream = "\n".join(body).encode("latin-1")
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Resources << /Font << /F1 "
                    f"{font_id} 0 R >> >> /Contents {4 + 2 * k} 0 R >>".encode())
        objs.append(b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream")
    objs.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Courier /Encoding /WinAnsiEncoding >>")
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for i, o in enumerate(objs, start=1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n".encode() + o + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n".encode() + b"0000000000 65535 f \n"
    out += b"".join(f"{off:010d} 00000 n \n".encode() for off in offsets)
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


# ---------------------------------------------------------------------------- the zip
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_package(label: dict, out_dir: Path = DEFAULT_OUT, *, image_tar: Path | None = None,
                  guide: Path = GUIDE) -> Path:
    """Write the deliverable zip (layouts: module docstring). Returns the zip's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = base_name(label)
    pdf = out_dir / f"{base}.pdf"
    pdf.write_bytes(text_pdf(Path(guide).read_text(encoding="utf-8")))
    label_file = out_dir / f"{base}.json"
    label_file.write_text(json.dumps(label, indent=2) + "\n")
    tar = out_dir / f"{base}.tar"
    if image_tar is not None:
        image_tar = Path(image_tar)
        if not image_tar.is_file():
            raise FileNotFoundError(f"image tar {image_tar} not found")
        if image_tar.resolve() != tar.resolve():
            shutil.copyfile(image_tar, tar)
    files = [pdf, label_file] + ([tar] if image_tar is not None else [])
    manifest = {
        "package": f"{base}.zip",
        "layout": "scanner" if image_tar is not None else "staging",
        "image": image_name(label),
        "label_key": LABEL_KEY,
        "label_base64": label_base64(label),
        "files": [{"name": f.name, "bytes": f.stat().st_size, "sha256": _sha256(f)} for f in files],
        "image_tar": {
            "name": tar.name,
            "included": image_tar is not None,
            "how": "on a machine with Docker: python docker/openrecon/build_openrecon.py --build-image "
                   "(docker build with the label, docker save -o " + tar.name + ", then the scanner zip: "
                   + tar.name + " + " + pdf.name + ")",
        },
    }
    manifest_file = out_dir / "manifest.json"
    manifest_file.write_text(json.dumps(manifest, indent=2) + "\n")
    zpath = out_dir / f"{base}.zip"
    members = [tar, pdf] if image_tar is not None else [pdf, label_file, manifest_file]
    tmp = zpath.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for f in members:
            z.write(f, arcname=f.name)
    tmp.replace(zpath)
    return zpath


# ---------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", type=Path, default=LABEL, help="label JSON (default docker/openrecon/label.json)")
    ap.add_argument("--schema", type=Path, default=SCHEMA,
                    help="JSON schema (default docker/openrecon/schema-1.1.0.json; the official "
                         "OpenReconSchema_1.1.0.json when you have it)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default dist/openrecon)")
    ap.add_argument("--image-tar", type=Path, default=None, help="`docker save` tar of the image: build the scanner zip")
    ap.add_argument("--build-image", action="store_true",
                    help="run docker build and docker save first (needs a Docker engine), then the scanner zip")
    ap.add_argument("--print-label", action="store_true", help="only validate and print the base64 label")
    ap.add_argument("--validate-only", action="store_true", help="only validate")
    args = ap.parse_args(argv)

    label = load_json(args.label)
    errs, how = validate(label, load_json(args.schema))
    errs += [f"VNE: {e}" for e in check_vne(label)]
    if errs:
        print(f"build_openrecon: {args.label} is not valid ({how}):", file=sys.stderr)
        for e in errs:
            print(f"  {e}", file=sys.stderr)
        return 1
    if args.print_label:
        print(label_base64(label))
        return 0
    print(f"build_openrecon: {args.label.name} is valid against {args.schema.name} ({how})")
    if args.validate_only:
        return 0
    print(f"Docker image label {LABEL_KEY}:\n{label_base64(label)}")
    image_tar = args.image_tar
    if args.build_image:
        if shutil.which("docker") is None:
            print("build_openrecon: error: --build-image needs a Docker engine (docker not found)", file=sys.stderr)
            return 2
        for cmd in docker_commands(label, args.out):
            args.out.mkdir(parents=True, exist_ok=True)
            print("+ " + " ".join(c if len(c) < 80 else c[:60] + "..." for c in cmd))
            subprocess.run(cmd, cwd=REPO, check=True)
        image_tar = args.out / f"{base_name(label)}.tar"
    zpath = build_package(label, args.out, image_tar=image_tar)
    with zipfile.ZipFile(zpath) as z:
        names = z.namelist()
    print(f"build_openrecon: wrote {zpath} ({', '.join(names)})")
    if image_tar is None:
        print(f"build_openrecon: staging layout: the image tar {base_name(label)}.tar is not included (no Docker "
              f"engine here); on a machine with Docker run this script with --build-image for the scanner zip")
    return 0


if __name__ == "__main__":
    sys.exit(main())
