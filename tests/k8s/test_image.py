"""deploy/Dockerfile, checked without a Docker engine: what it copies is enough to install OneCDP whole.

The builder stage copies a few paths and runs `pip install .`. Here the same paths are copied into an
empty directory and built into a wheel with the same build backend; the wheel must contain every
module and schema file of the project and the console scripts the Kubernetes manifests run.
"""

from __future__ import annotations

import configparser
import fnmatch
import json
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from deploy import manifests
from shared.config import SERVICE_NAMES

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "Dockerfile"


def _instructions(dockerfile: Path) -> list[list[str]]:
    """Instructions as shell-like token lists (not for JSON-form arguments)."""
    return [shlex.split(instruction) for instruction in _lines(dockerfile)]


def _lines(dockerfile: Path) -> list[str]:
    """Instructions with continuation lines joined and comments dropped."""
    joined: list[str] = []
    pending = ""
    for line in dockerfile.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            joined.append(pending.strip())
            pending = ""
    return joined


def _builder_copy_sources() -> list[str]:
    """Sources of the builder stage's COPY instructions (those from the build context)."""
    stage, sources = None, []
    for tokens in _instructions(DOCKERFILE):
        keyword = tokens[0].upper()
        if keyword == "FROM":
            stage = tokens[-1] if len(tokens) >= 4 and tokens[-2].upper() == "AS" else None
        elif keyword == "COPY" and stage == "builder" and not any(t.startswith("--from") for t in tokens):
            sources += [token for token in tokens[1:-1] if not token.startswith("--")]
    return sources


def _ignored(path: str) -> bool:
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    top = path.rstrip("/").split("/")[0]
    return any(fnmatch.fnmatch(top, pattern) or fnmatch.fnmatch(path.rstrip("/"), pattern) for pattern in patterns)


def test_the_builder_copies_existing_paths_the_context_does_not_exclude() -> None:
    sources = _builder_copy_sources()
    assert "pyproject.toml" in sources
    for source in sources:
        assert (REPO / source).exists(), source
        assert not _ignored(source), f"{source} is excluded by .dockerignore"


def test_the_runtime_is_non_root_and_starts_a_service() -> None:
    instructions = _instructions(DOCKERFILE)
    last_stage = max(i for i, tokens in enumerate(instructions) if tokens[0].upper() == "FROM")
    runtime = instructions[last_stage:]
    users = [tokens[1] for tokens in runtime if tokens[0].upper() == "USER"]
    # Numeric, so that Kubernetes' runAsNonRoot can verify it.
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) != 0
    # The exec form (JSON), so that the service itself is PID 1 and receives SIGTERM.
    command = next(json.loads(line.split(None, 1)[1]) for line in reversed(_lines(DOCKERFILE))
                   if line.upper().startswith("CMD "))
    assert command == ["onecdp-identity"]


def test_the_runtime_imports_every_command_the_manifests_run() -> None:
    """The runtime stage's import check covers each console script and the migration Job, and passes here."""
    instructions = _lines(DOCKERFILE)
    last_stage = max(i for i, line in enumerate(instructions) if line.upper().startswith("FROM "))
    (check,) = [shlex.split(line)[1:] for line in instructions[last_stage:]
                if line.upper().startswith("RUN ") and " -c " in line and "import " in line]
    assert check[1] == "-c"
    imported = {name.strip() for name in check[2].removeprefix("import ").split(",")}
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    entry_modules = {target.split(":")[0] for target in scripts.values()}
    assert entry_modules | {manifests.MIGRATIONS_COMMAND[2]} <= imported
    subprocess.run([sys.executable, "-c", check[2]], check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """The wheel `pip install .` builds from exactly what the Dockerfile copies."""
    context = tmp_path_factory.mktemp("image-context")
    for source in _builder_copy_sources():
        origin = REPO / source
        if origin.is_dir():
            shutil.copytree(origin, context / source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(origin, context / source)
    out = tmp_path_factory.mktemp("wheel")
    # --no-build-isolation: the venv's setuptools is the same backend pyproject.toml asks for, and this
    # keeps the test offline.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(context)], check=True, capture_output=True, timeout=300)
    (built,) = out.glob("onecdp-*.whl")
    return zipfile.ZipFile(built)


def test_the_wheel_holds_every_module_schema_and_generated_file(wheel: zipfile.ZipFile) -> None:
    in_wheel = set(wheel.namelist())
    expected = {str(path.relative_to(REPO)) for package in ("shared", "services")
                for path in (REPO / package).rglob("*") if path.suffix in {".py", ".cql"}
                and "__pycache__" not in path.parts}
    generated = REPO / "protos" / "gen" / "python"
    expected |= {str(path.relative_to(generated)) for path in generated.rglob("*.py")}
    assert any(name.endswith(".cql") for name in expected) and "onecdp/identity/v1/identity_service_pb2.py" in expected
    assert expected - in_wheel == set()


def test_the_wheel_installs_the_entrypoints_the_manifests_run(wheel: zipfile.ZipFile) -> None:
    (entry_points_file,) = [name for name in wheel.namelist() if name.endswith(".dist-info/entry_points.txt")]
    entry_points = configparser.ConfigParser()
    entry_points.read_string(wheel.read(entry_points_file).decode())
    scripts = dict(entry_points["console_scripts"])
    for service in SERVICE_NAMES:
        assert scripts[f"onecdp-{service}"] == f"services.{service}.__main__:main"
    # The migration Job's `python -m <module>`, and what it runs.
    job_module = manifests.MIGRATIONS_COMMAND[2].replace(".", "/") + ".py"
    assert {job_module, "shared/migrations.py"} <= set(wheel.namelist())
