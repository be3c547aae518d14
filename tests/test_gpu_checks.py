"""The GPU check scripts and the GPU extras, on a machine without a GPU: each script says
that no GPU was found and exits 0 with a skip; the two bare-machine checks import nothing
beyond torch, CuPy / cuda-python, NVRTC and numpy (no onnxruntime, no TensorRT) and
install nothing; the extras install what the GPU path imports, never the CPU onnxruntime."""

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
BARE = ("gpu_kernel_check.py", "gpu_runtime_check.py")  # run on a bare GPU machine
SCRIPTS = (*BARE, "gpu_serve_check.py")
# what a bare GPU machine has (beyond the standard library) and the project's own code
ALLOWED = {"numpy", "torch", "cupy", "cuda", "grata", "gpu_checkout", "gpu_runtime_check"}
FORBIDDEN = ("onnxruntime", "tensorrt", "onnx", "scipy", "PIL", "tqdm", "matplotlib")

# onnxruntime and TensorRT (and the packages a bare GPU machine lacks) refuse to import
BLOCKER = f"""
import sys
class _Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {FORBIDDEN!r}:
            raise ImportError(f"{{name}} is not on a bare GPU machine")
        return None
sys.meta_path.insert(0, _Refuse())
"""


def _run(code: str, *args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, check=False,
                          text=True, timeout=240, cwd=BENCH, env=env)


def _no_gpu_env() -> dict:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


@pytest.mark.parametrize("script", SCRIPTS)
def test_without_a_gpu_each_check_says_so_and_skips(script):
    blocker = BLOCKER if script in BARE else ""
    code = (f"{blocker}\nimport runpy, sys\nsys.argv = [{script!r}]\n"
            f"runpy.run_path({str(BENCH / script)!r}, run_name='__main__')")
    done = _run(code, env=_no_gpu_env())
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "SKIPPED: no GPU found" in out and "nothing was checked" in out, out
    assert "Traceback" not in out


def _imports(path: Path, everywhere: bool) -> set[str]:
    """Absolute module names imported by `path` (inside functions too if `everywhere`)."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = ast.walk(tree) if everywhere else tree.body
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def _module_file(name: str) -> Path | None:
    folders = {"grata.kernels": "kernels", "grata.runtime": "runtime",
               "grata.export": "export", "grata.calibration": "calibration"}
    for pkg, folder in folders.items():
        if name == pkg or name.startswith(pkg + "."):
            rest = name[len(pkg):].lstrip(".").split(".") if name != pkg else []
            base = ROOT / folder
            break
    else:
        if not name.startswith("grata"):
            return None
        rest, base = name.split(".")[1:], ROOT / "grata"
    for candidate in (base.joinpath(*rest).with_suffix(".py"),
                      base.joinpath(*rest, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


def _closure(script: Path) -> set[str]:
    """Top-level packages the script needs: its own imports (anywhere), and the module-
    level imports of every grata module they reach, transitively."""
    externals, seen = set(), set()
    todo = [(script, True)]
    while todo:
        path, everywhere = todo.pop()
        for name in _imports(path, everywhere):
            top = name.split(".")[0]
            if top in ("grata", "gpu_checkout", "gpu_runtime_check"):
                target = _module_file(name) if top == "grata" else BENCH / f"{top}.py"
                if target is not None and target not in seen:
                    seen.add(target)
                    todo.append((target, top != "grata"))
            else:
                externals.add(top)
    return externals


@pytest.mark.parametrize("script", BARE)
def test_bare_machine_checks_import_only_what_a_bare_gpu_machine_has(script):
    needed = _closure(BENCH / script)
    stdlib = set(sys.stdlib_module_names)
    assert not needed - stdlib - ALLOWED, sorted(needed - stdlib - ALLOWED)
    assert not needed & set(FORBIDDEN)
    text = (BENCH / script).read_text() + (BENCH / "gpu_checkout.py").read_text()
    assert "subprocess" not in needed and "pip install" not in text  # installs nothing


def test_checks_find_grata_in_the_checkout_when_it_is_not_installed(tmp_path):
    """As on a bare GPU machine: grata not installed, the stage folders found as grata.*
    in this checkout."""
    code = f"""{BLOCKER}
import sys
def _editable(f):
    return "editable" in (repr(f) + getattr(f, "__module__", "") + type(f).__module__).lower()
sys.meta_path[:] = [f for f in sys.meta_path if not _editable(f)]
sys.path_hooks[:] = [h for h in sys.path_hooks if not _editable(h)]
for name in [m for m in sys.modules if m == "grata" or m.startswith("grata.")]:
    del sys.modules[name]
sys.path_importer_cache.clear()
sys.path[:] = [p for p in sys.path if p != {str(ROOT)!r}]
try:
    import grata.kernels
    print("installed")
except ImportError:
    from gpu_checkout import use_checkout
    use_checkout()
    import grata.kernels, grata.kernels.cuda_update, grata.torch_engine, grata.methods
    print(grata.kernels.__file__)
"""
    done = _run(code)
    out = done.stdout.strip()
    assert done.returncode == 0, done.stderr
    if out == "installed":
        pytest.skip("the editable install cannot be hidden in this environment")
    assert Path(out) == ROOT / "kernels" / "__init__.py"


def test_gpu_extras_install_what_the_gpu_path_imports():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]

    def names(extra):
        return {r.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0]
                .strip() for r in extras[extra]}

    gpu = names("gpu")
    assert {"cuda-python", "cuda-core"} <= gpu  # the launch (cuda.core, cuda.bindings)
    assert any(n.startswith("nvidia-cuda-nvrtc") for n in gpu)  # the run-time compile
    assert any(n.startswith("cupy-cuda") for n in gpu)  # the CUDA engine's arrays
    assert names("gpu-onnxruntime") == {"onnxruntime-gpu"}
    assert {n.split("-cu")[0] for n in names("gpu-tensorrt")} == {"tensorrt"}
    for extra in ("gpu", "gpu-onnxruntime", "gpu-tensorrt"):
        assert "onnxruntime" not in names(extra), extra  # never the CPU build beside it
    readme = (ROOT / "README.md").read_text()
    assert "grata-edge[gpu,gpu-onnxruntime" in readme and "Jetson" in readme
