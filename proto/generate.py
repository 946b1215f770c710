"""Regenerate the gRPC stubs from fedq_v1.proto, or check that they are current.

python -m proto.generate          # rewrite proto/fedq_v1_pb2*.py(i)
python -m proto.generate --check  # exit 1 if the committed stubs are stale
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = "proto/fedq_v1.proto"
OUTPUTS = ("fedq_v1_pb2.py", "fedq_v1_pb2.pyi", "fedq_v1_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    """Run protoc (from grpcio-tools) with ``out_dir`` as the output root."""
    from grpc_tools import protoc

    args = [
        "protoc",
        f"-I{ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(ROOT / SOURCE),
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {SOURCE}")


def main() -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="only compare, change nothing")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [
            name
            for name in OUTPUTS
            if not (ROOT / "proto" / name).exists()
            or not filecmp.cmp(Path(tmp) / "proto" / name, ROOT / "proto" / name, shallow=False)
        ]
        if args.check:
            if stale:
                print(
                    f"stale gRPC stubs: {', '.join(stale)}; run python -m proto.generate",
                    file=sys.stderr,
                )
                return 1
            print("gRPC stubs are current")
            return 0
        for name in OUTPUTS:
            shutil.copyfile(Path(tmp) / "proto" / name, ROOT / "proto" / name)
    print(f"regenerated {', '.join(OUTPUTS)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
