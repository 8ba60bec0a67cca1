"""Regenerate the Python stubs of the wire contract from the .proto sources.

The proto path root is the repository root, so the generated `_pb2_grpc.py` imports its messages as
`protos.vla_mbpo.v1.world_model_pb2` (package-relative, importable from an installed tree).

    python -m protos.generate            # rewrite the committed stubs
    python -m protos.generate --check    # exit 1 if the committed stubs are stale
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_FILES = ("protos/vla_mbpo/v1/world_model.proto",)
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Runs protoc for every proto file into out_dir; returns the generated files (relative)."""
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{REPO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *PROTO_FILES,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {PROTO_FILES}")
    return [Path(proto).with_suffix("").with_name(Path(proto).stem + suffix)
            for proto in PROTO_FILES for suffix in GENERATED_SUFFIXES]


def stale_files() -> list[str]:
    """Generated files that differ from (or are missing in) the committed tree."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        return [str(rel) for rel in generate(fresh) if not (REPO_ROOT / rel).exists()
                or not filecmp.cmp(fresh / rel, REPO_ROOT / rel, shallow=False)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protos.generate", description=__doc__)
    parser.add_argument("--check", action="store_true", help="only report stale stubs (exit 1 if any)")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for path in stale:
            print(f"stale: {path} (run `python -m protos.generate`)", file=sys.stderr)
        return 1 if stale else 0
    for rel in generate(REPO_ROOT):
        print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
