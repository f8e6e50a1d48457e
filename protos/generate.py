"""Generate the Python code for the OneCDP protos, check it is current, and lint the protos.

    python protos/generate.py            # regenerate protos/gen/python from protos/onecdp
    python protos/generate.py --check    # exit 1 if the checked-in generated code is stale
    python protos/generate.py --lint     # buf lint (STANDARD + COMMENTS) over protos/onecdp

Generation uses grpc_tools' bundled protoc (pinned in pyproject) with the mypy-protobuf plugins for
type stubs, and takes the googleapis protos (google/api, google/rpc, google/longrunning) from the
googleapis-common-protos wheel, so nothing is fetched from the network. Buf lints a descriptor
image built by the same protoc, for the same reason: buf's own dependency resolution needs the BSR.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import google.api
from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
SOURCE_DIR = PROTO_ROOT / "onecdp"
OUTPUT_DIR = PROTO_ROOT / "gen" / "python"
BUF_CONFIG = PROTO_ROOT / "buf.yaml"
GENERATED_PACKAGE = "onecdp"


def _googleapis_include() -> Path:
    # google.api is a namespace-less regular package inside site-packages/google/api.
    return Path(next(iter(google.api.__path__))).parent.parent


def _wellknown_include() -> Path:
    return Path(protoc.__file__).parent / "_proto"


def _proto_files() -> list[Path]:
    return sorted(SOURCE_DIR.rglob("*.proto"))


def _run_protoc(args: list[str]) -> None:
    # protoc.main takes argv including the program name; it returns protoc's exit status.
    status = protoc.main(["protoc", *args])
    if status != 0:
        raise SystemExit(f"protoc failed with status {status}")


def _longrunning_include(tmp: Path) -> Path:
    # The wheel's Python module registers its descriptor as `google/longrunning/operations.proto`,
    # but ships the source as `operations_proto.proto`. Our protos import the registered name (so
    # the descriptor pools agree at runtime); this stages the source under that name.
    target = tmp / "google" / "longrunning" / "operations.proto"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_googleapis_include() / "google" / "longrunning" / "operations_proto.proto", target)
    return tmp


def _include_args(tmp: Path) -> list[str]:
    return [f"-I{PROTO_ROOT}", f"-I{_longrunning_include(tmp)}", f"-I{_googleapis_include()}",
            f"-I{_wellknown_include()}"]


def generate(out_dir: Path) -> None:
    """Write the generated modules, type stubs and package markers for every proto into out_dir."""
    bin_dir = Path(sys.executable).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [str(path.relative_to(PROTO_ROOT)) for path in _proto_files()]
    with tempfile.TemporaryDirectory() as include_tmp:
        _run_protoc(
        [
            *_include_args(Path(include_tmp)),
            f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            f"--mypy_out={out_dir}",
            f"--mypy_grpc_out={out_dir}",
            *files,
        ]
        )
    package_root = out_dir / GENERATED_PACKAGE
    for directory in [package_root, *sorted(p for p in package_root.rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()
    (package_root / "py.typed").touch()


def _tree_files(root: Path) -> dict[Path, Path]:
    return {path.relative_to(root): path for path in root.rglob("*") if path.is_file()
            and "__pycache__" not in path.parts}


def check() -> int:
    """Regenerate into a temporary directory and compare it with the checked-in tree."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh_root = Path(tmp)
        generate(fresh_root)
        fresh = _tree_files(fresh_root)
        current = _tree_files(OUTPUT_DIR) if OUTPUT_DIR.exists() else {}
        stale = sorted(
            {str(p) for p in fresh.keys() ^ current.keys()}
            | {str(p) for p in fresh.keys() & current.keys()
               if not filecmp.cmp(fresh[p], current[p], shallow=False)}
        )
    if stale:
        print("Generated code is stale; run `python protos/generate.py` and commit the result:")
        for name in stale:
            print(f"  protos/gen/python/{name}")
        return 1
    print(f"Generated code is current ({len(fresh)} files).")
    return 0


def lint() -> int:
    """Run buf lint over our protos (imports are in the image but not linted)."""
    buf = shutil.which("buf", path=str(Path(sys.executable).parent)) or shutil.which("buf")
    if buf is None:
        raise SystemExit("buf not found: install the dev extras (buf-bin)")
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "onecdp.binpb"
        files = [str(path.relative_to(PROTO_ROOT)) for path in _proto_files()]
        _run_protoc([*_include_args(Path(tmp)), "--include_imports", "--include_source_info",
                     f"--descriptor_set_out={image}", *files])
        result = subprocess.run(
            [buf, "lint", str(image), "--config", str(BUF_CONFIG), "--path", GENERATED_PACKAGE],
            check=False,
        )
    if result.returncode == 0:
        print(f"buf lint: {len(files)} proto files clean.")
    return result.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="fail if the generated code is stale")
    mode.add_argument("--lint", action="store_true", help="run buf lint over the protos")
    args = parser.parse_args()
    if args.check:
        return check()
    if args.lint:
        return lint()
    if OUTPUT_DIR.exists():
        shutil.rmtree(OUTPUT_DIR)
    generate(OUTPUT_DIR)
    print(f"Generated {len(_tree_files(OUTPUT_DIR))} files into {OUTPUT_DIR.relative_to(PROTO_ROOT.parent)}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
