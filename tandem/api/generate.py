"""Regenerate the Python stubs of `proto/tandem/v1/*.proto` into `tandem/api/`.

Usage: `python -m tandem.api.generate [--out DIR | --check]`. `--check` writes nothing: it
exits 1, naming what differs, when the committed stubs no longer match the protos (version
headers of the generator aside; see `tandem.api.drift`).

protoc names imports after the proto path (`from tandem.v1 import x_pb2`); the stubs live in
`tandem.api`, so those imports are rewritten to `from tandem.api import x_pb2`. The descriptor
keeps its proto path (`tandem/v1/...`), so reflection and the descriptor pool see the real name.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "proto"
PROTO_PACKAGE_DIR = Path("tandem") / "v1"
API_DIR = Path(__file__).resolve().parent
_IMPORT = re.compile(r"^from tandem\.v1 import (\w+_pb2)", re.MULTILINE)
_PYI_IMPORT = re.compile(r"^from tandem\.v1 import", re.MULTILINE)


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """The .proto sources, relative to `proto_root`, in a stable order."""
    sources = (proto_root / PROTO_PACKAGE_DIR).glob("*.proto")
    return sorted(p.relative_to(proto_root) for p in sources)


def _run_protoc(out_dir: Path, proto_root: Path) -> None:
    from grpc_tools import protoc  # only the generator needs grpcio-tools

    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p) for p in proto_files(proto_root)],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")


def _fix_imports(text: str) -> str:
    text = _IMPORT.sub(r"from tandem.api import \1", text)
    return _PYI_IMPORT.sub("from tandem.api import", text)


def generate(out_dir: Path = API_DIR, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Compile every proto into `out_dir` (flat: `x_pb2.py`, `x_pb2_grpc.py`, `x_pb2.pyi`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        _run_protoc(Path(tmp), proto_root)
        for src in sorted((Path(tmp) / PROTO_PACKAGE_DIR).iterdir()):
            dst = out_dir / src.name
            dst.write_text(_fix_imports(src.read_text()))
            written.append(dst)
    return written


def check(committed_dir: Path = API_DIR, proto_root: Path = PROTO_ROOT) -> list[str]:
    """What differs between the stubs in `committed_dir` and a fresh generation from the protos."""
    from tandem.api.drift import stub_drift

    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp), proto_root)
        return stub_drift(committed_dir, Path(tmp))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=API_DIR)
    parser.add_argument("--check", action="store_true", help="compare, write nothing")
    args = parser.parse_args(argv)
    if args.check:
        problems = check(args.out)
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1 if problems else 0
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
