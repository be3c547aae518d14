"""The package's import graph, drawn from the source with ast: no cycle, and the data
flows one way (data -> model -> export -> runtime -> serving): the lower stages never
import the runtime, the command line or the benchmarks. One import style: absolute
`grata.` imports, at module top except for the optional or heavy dependencies below, and
no private name imported from another module. And one place for each job: engines made
by one chooser, the gate's comparison called by one module (the per-image pipeline)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# package -> folder, as in pyproject's package-dir
FOLDERS = {"grata": "grata", "grata.export": "export", "grata.runtime": "runtime",
           "grata.kernels": "kernels", "grata.calibration": "calibration"}
LOWER = ("grata.domains", "grata.decode", "grata.masks", "grata.synth",
         "grata.models", "grata.export", "grata.kernels", "grata.losses", "grata.augment",
         "grata.metrics", "grata.engine_protocol", "grata.methods", "grata.placement",
         "grata.picture", "grata.pipeline")
UPPER = ("grata.runtime", "grata.cli", "grata.bench", "grata.calibration")

# The packages a function may import, and why: the module that does must import without
# them (or without paying for them until they are used).
LAZY_PACKAGES = {
    "torch": "the reference, training and the export; the device runtime runs without it",
    "onnx": "the export and calibration; the device runtime runs without it",
    "onnxruntime": "the device extra; the package imports where it is not installed",
    "tensorrt": "the TensorRT predictor on a GPU device; optional",
    "cuda": "cuda-python, the GPU extra (the fused update, GPU probes); optional",
    "cupy": "GPU arrays for the fused update; optional",
    "matplotlib": "the plots of the HTML report (the report extra); optional",
    "scipy": "start-up: grata --help and the device runtime import without it (its "
             "ndimage costs about half a second)",
}
# A grata module whose import loads one of LAZY_PACKAGES (grata.models: torch) counts as
# that package: it is imported where it is used, for the same reason.

# Imports inside functions kept on purpose inside grata: {importing module: {the grata
# module imported, or the top-level name of another package}}. The benchmark workers
# measure their own peak memory and page faults per configuration, so each imports only
# what the configuration it runs needs (the onnxruntime runtime, the kernels, the method).
KEPT_LAZY = {
    "grata.bench.workers": {"grata.augment", "grata.bench.convlimit", "grata.kernels",
                            "grata.methods", "grata.runtime.heap", "grata.bench.scale_stream"},
}


def modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if pkg == "grata" and parts and f"grata.{parts[0]}" in FOLDERS:
                continue  # a folder of its own above
            out[".".join([pkg, *parts])] = path
    return out


def package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def absolute(node: ast.ImportFrom, package: str) -> str:
    """The absolute module name of a `from ... import` inside `package`."""
    base = node.module or ""
    if not node.level:
        return base
    anchor = package.split(".")
    anchor = anchor[:len(anchor) - node.level + 1]
    return ".".join(anchor + ([base] if base else []))


def imports(name: str, path: Path, known) -> set[str]:
    """Modules of the package `name` imports anywhere (top level or inside functions)."""
    package = package_of(name, path)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = absolute(node, package)
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # an attribute of a module: its module
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def resolve(target: str, known) -> str | None:
    """The module of the package an import target names (an attribute: its module)."""
    while target and target not in known:
        target = target.rpartition(".")[0]
    return target or None


def targets(node, package: str) -> list[str]:
    """What an import statement imports: modules, or a module's attributes (dotted)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = absolute(node, package)
    return [f"{base}.{a.name}" for a in node.names]


def lazy_key(target: str, known) -> str:
    """How KEPT_LAZY names an import target: its grata module, else its package."""
    return resolve(target, known) or target.split(".")[0]


FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


def function_imports(tree) -> list:
    """Import statements inside functions (nested ones once)."""
    found = {}
    for fn in ast.walk(tree):
        if isinstance(fn, FUNCTIONS):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    found[id(node)] = node
    return list(found.values())


def top_imports(tree) -> list:
    """Import statements that run when the module is imported (module level, class bodies,
    if/try blocks; not functions, not `if TYPE_CHECKING:`)."""
    found = []

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, FUNCTIONS):
                continue
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            visit(child)
    visit(tree)
    return found


def heavy_modules() -> set[str]:
    """The package's modules whose import loads one of LAZY_PACKAGES (their own top-level
    imports, those of the modules they import, and their parent packages')."""
    mods = modules()
    heavy, deps = set(), {}
    for name, path in mods.items():
        parts = name.split(".")
        deps[name] = {".".join(parts[:i]) for i in range(1, len(parts))} & set(mods)
        for node in top_imports(ast.parse(path.read_text())):
            for t in targets(node, package_of(name, path)):
                if t.split(".")[0] in LAZY_PACKAGES:
                    heavy.add(name)
                m = resolve(t, mods)
                if m and m != name:
                    deps[name].add(m)
    grew = True
    while grew:
        more = {n for n, d in deps.items() if n not in heavy and d & heavy}
        heavy |= more
        grew = bool(more)
    return heavy


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, mods) for name, path in mods.items()}


def test_graph_sees_the_package():
    g = graph()
    assert {"grata.cli.adapt", "grata.runtime.inbox", "grata.export.manifest",
            "grata.bench.workers", "grata.methods.base"} <= set(g)
    assert "grata.runtime.adaptive" in g["grata.runtime.inbox"]
    assert "grata.export.manifest" in g["grata.runtime.ort_engine"]
    assert "grata.pipeline" in g["grata.runtime.adaptive"] and "grata.pipeline" in g[
        "grata.adapt"] and "grata.pipeline" in g["grata.bench.workers"]


def _in(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            # a package's __init__ re-exporting its own modules is not a cycle of work
            if m == n.rpartition(".")[0] and n.startswith(m + "."):
                continue
            if state.get(m) == 1:
                cycle = stack[stack.index(m):] + [m]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n)


def test_lower_stages_never_import_upper_ones():
    bad = [(a, b) for a, deps in graph().items() if _in(a, LOWER)
           for b in deps if _in(b, UPPER)]
    assert not bad, bad


def test_runtime_never_imports_the_command_line_or_the_benchmarks():
    bad = [(a, b) for a, deps in graph().items() if _in(a, ("grata.runtime",))
           for b in deps if _in(b, ("grata.cli", "grata.bench"))]
    assert not bad, bad


def test_no_private_name_is_imported_across_packages():
    mods = modules()
    bad = []
    for name, path in mods.items():
        package = package_of(name, path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = absolute(node, package)
                src_pkg = base if base in mods and mods[base].name == "__init__.py" \
                    else base.rpartition(".")[0]
                for a in node.names:
                    if base.startswith("grata") and a.name.startswith("_") \
                            and not a.name.startswith("__") and src_pkg != package:
                        bad.append((name, base, a.name))
    assert not bad, bad


def test_imports_inside_functions_are_optional_or_heavy_dependencies():
    mods, heavy = modules(), heavy_modules()
    assert {"grata.models", "grata.train", "grata.export.exporter"} <= heavy
    assert not heavy & {"grata.domains", "grata.gate", "grata.cli", "grata.export"}
    bad = []
    for name, path in mods.items():
        package = package_of(name, path)
        for node in function_imports(ast.parse(path.read_text())):
            for t in targets(node, package):
                if t.split(".")[0] in LAZY_PACKAGES or resolve(t, mods) in heavy:
                    continue
                if lazy_key(t, mods) not in KEPT_LAZY.get(name, ()):
                    bad.append(f"{name}:{node.lineno} imports {t} inside a function")
    assert not bad, "\n".join(bad)


def test_pending_lazy_imports_are_still_there():
    mods = modules()
    stale = []
    for name, pending in KEPT_LAZY.items():
        path = mods[name]
        found = {lazy_key(t, mods) for node in function_imports(ast.parse(path.read_text()))
                 for t in targets(node, package_of(name, path))}
        stale += [f"{name} -> {m}" for m in sorted(set(pending) - found)]
    assert not stale, f"now imported at the top, remove from KEPT_LAZY: {stale}"



def test_no_private_name_is_imported_across_modules():
    mods = modules()
    bad = []
    for name, path in mods.items():
        package = package_of(name, path)
        tree = ast.parse(path.read_text())
        local = {}  # names bound to a module of the package
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and absolute(node, package).startswith("grata"):
                base = absolute(node, package)
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        bad.append(f"{name}:{node.lineno} from {base} import {a.name}")
                    if f"{base}.{a.name}" in mods:
                        local[a.asname or a.name] = f"{base}.{a.name}"
            elif isinstance(node, ast.Import):
                local.update({a.asname: a.name for a in node.names
                              if a.asname and a.name in mods})
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in local and node.attr.startswith("_") \
                    and not node.attr.startswith("__"):
                bad.append(f"{name}:{node.lineno} {local[node.value.id]}.{node.attr}")
    assert not bad, bad


# -- one place for each job ---------------------------------------------------------------

SOURCE_FOLDERS = ("grata", "export", "runtime", "kernels", "calibration", "benchmarks",
                  "tools", "docs", "tests")
ENGINE_CLASSES = {"OrtEngine", "CudaEngine", "TorchEngine"}
# the one chooser, and each engine's own module
ENGINE_MAKERS = {"grata/engine_chooser.py", "runtime/ort_engine.py", "runtime/cuda_engine.py",
                 "grata/torch_engine.py"}


def python_files(folders=SOURCE_FOLDERS) -> dict[str, ast.Module]:
    return {str(p.relative_to(ROOT)): ast.parse(p.read_text(), str(p))
            for f in folders for p in sorted((ROOT / f).rglob("*.py"))}


def calls(tree: ast.Module, names: set[str]) -> list[str]:
    """Names in `names` called in `tree` (as NAME(...) or module.NAME(...))."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(
                f, ast.Attribute) else None
            if name in names:
                out.append(name)
    return out


def test_no_relative_import_anywhere():
    bad = [(path, node.lineno) for path, tree in python_files().items()
           for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level]
    assert not bad, bad


def test_engines_are_made_only_by_the_chooser_and_their_own_modules():
    makers = {path for path, tree in python_files().items()
              if not path.startswith("tests/") and calls(tree, ENGINE_CLASSES)}
    assert makers <= ENGINE_MAKERS, sorted(makers - ENGINE_MAKERS)
    assert "grata/engine_chooser.py" in makers


def test_the_gates_comparison_is_called_from_one_module():
    callers = {path for path, tree in python_files().items()
               if not path.startswith("tests/") and calls(tree, {"gated_predict"})}
    assert callers == {"grata/pipeline.py"}


def test_the_checks_see_what_they_look_for():
    tree = ast.parse("from .x import y\nimport grata.runtime as r\n"
                     "e = r.OrtEngine(a)\nTorchEngine(m)\ngated_predict(g)\n")
    assert [n.level for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)] == [1]
    assert calls(tree, ENGINE_CLASSES) == ["OrtEngine", "TorchEngine"]
    assert calls(tree, {"gated_predict"}) == ["gated_predict"]
