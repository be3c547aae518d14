"""Mutation check: put plausible bugs into a copy of the project, one at a time, and make
sure the test suite notices each of them.

    python tools/mutate.py              # every mutant; a table; exit 1 if one survives
    python tools/mutate.py --list       # names only
    python tools/mutate.py -k adam      # mutants whose name contains "adam"

The repository (tracked and untracked, not ignored, files) is copied to a temporary folder
once. The copy is made importable as installed (the pyproject's package-dir mapping, e.g.
`grata.export` = `export/`, rebuilt with symbolic links) in a throwaway virtual
environment that sees this interpreter's packages, with a `grata` console script of its
own; nothing is installed and this checkout is never touched. Each mutant replaces one
exact snippet (which must occur exactly once), runs its tests, and restores the file. A
mutant is killed when a test fails (or the run times out); a collection error is a
broken mutant, not a kill.

Adding a mutant is one entry in MUTANTS: name, file, exact original, replacement, tests.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: pip carries the same parser
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str
    new: str
    tests: str  # pytest arguments, relative to the repository root


MUTANTS = [
    # -- methods -------------------------------------------------------------------------
    Mutant("grata never updates theta", "grata/methods/grata.py",
           "    updates = True", "    updates = False",
           "tests/test_adaptation.py -k trajectory"),
    Mutant("perturbation theta + g_a", "grata/methods/grata.py",
           "e.theta -= g_a", "e.theta += g_a",
           "tests/test_adaptation.py -k theta_minus_g_a"),
    Mutant("perturbation step 0.5", "grata/methods/grata.py",
           "e.theta -= g_a", "e.theta -= 0.5 * g_a",
           "tests/test_adaptation.py -k theta_minus_g_a"),
    Mutant("noalign keeps the alignment", "grata/methods/grata.py",
           '    name = "grata-noalign"\n    align = False',
           '    name = "grata-noalign"\n    align = True',
           "tests/test_adaptation.py -k noalign"),
    Mutant("fixedlr keeps the cos rule", "grata/methods/grata.py",
           '    name = "grata-fixedlr"\n    dynamic_lr = False',
           '    name = "grata-fixedlr"\n    dynamic_lr = True',
           "tests/test_adaptation.py -k fixedlr"),
    Mutant("grata Adam beta2 0.99", "grata/methods/grata.py",
           "betas=(0.9, 0.999)", "betas=(0.9, 0.99)",
           "tests/test_adaptation.py -k defaults"),
    Mutant("grata default beta 1e-3", "grata/methods/grata.py",
           "beta: float = 1e-4", "beta: float = 1e-3",
           "tests/test_adaptation.py -k defaults"),
    Mutant("tent learning rate 1e-3", "grata/methods/tent.py",
           "lr: float = 1e-4", "lr: float = 1e-3",
           "tests/test_methods.py -k tent"),
    Mutant("reset keeps Adam's moments", "grata/methods/base.py",
           "self.m, self.v, self.t = e.zeros(), e.zeros(), 0",
           "self.m, self.v, self.t = getattr(self, 'm', e.zeros()), "
           "getattr(self, 'v', e.zeros()), getattr(self, 't', 0)",
           "tests/test_adaptation.py -k protocol"),
    Mutant("bn predicts with stored statistics", "grata/methods/__init__.py",
           'def create(name: str, model, norm="sample",', 'def create(name: str, model, norm="source",',
           "tests/test_methods.py -k source_uses_running"),
    # -- the update (numpy path) ----------------------------------------------------------
    Mutant("lr rule not squared", "kernels/numpy_update.py",
           "return beta * (cos + 1.0) * (cos + 1.0) / 4.0", "return beta * (cos + 1.0) / 2.0",
           "tests/test_adaptation.py -k trajectory"),
    Mutant("Adam without bias correction", "kernels/numpy_update.py",
           "bc1 = 1.0 - b1**step", "bc1 = 1.0",
           "tests/test_adaptation.py -k fixedlr"),
    Mutant("beta2 bias correction not square-rooted", "kernels/numpy_update.py",
           "bc2_sqrt = math.sqrt(1.0 - b2**step)", "bc2_sqrt = 1.0 - b2**step",
           "tests/test_adaptation.py -k trajectory"),
    Mutant("cos guard 1e-3", "kernels/numpy_update.py",
           "COS_EPS = 1e-12", "COS_EPS = 1e-3",
           "tests/test_kernels.py -k reduction"),
    Mutant("Adam eps inside the square root", "kernels/numpy_update.py",
           "    tmp += dtype(eps)\n", "    tmp = np.sqrt(tmp * tmp + dtype(eps))\n",
           "tests/test_kernels.py -k 'torch or adam'"),
    # -- losses ---------------------------------------------------------------------------
    Mutant("binary entropy", "grata/losses.py",
           "return -(p * torch.log(p + ENTROPY_EPS)).sum(1).mean()",
           "return -(p * torch.log(p + ENTROPY_EPS)"
           " + (1 - p) * torch.log(1 - p + ENTROPY_EPS)).sum(1).mean()",
           "tests/test_adaptation.py -k trajectory"),
    Mutant("entropy eps outside the log", "grata/losses.py",
           "torch.log(p + ENTROPY_EPS)", "(torch.log(p) + ENTROPY_EPS)",
           "tests/test_methods.py -k entropy"),
    Mutant("teacher rot90 inverse wrong", "grata/losses.py",
           "lambda t: torch.rot90(t, -1, (2, 3))", "lambda t: torch.rot90(t, 1, (2, 3))",
           "tests/test_adaptation.py -k trajectory"),
    Mutant("teacher averages logits", "grata/losses.py",
           "maps = [inv(torch.sigmoid(view_logits[i:i + 1]))",
           "maps = [inv(view_logits[i:i + 1])",
           "tests/test_adaptation.py -k trajectory"),
    # -- augmentation ---------------------------------------------------------------------
    Mutant("strong view is the input", "grata/augment.py",
           "    return _minmax(x).astype(np.float32)",
           "    return np.array(image, dtype=np.float32)",
           "tests/test_augment.py"),
    Mutant("strong view not min-max scaled", "grata/augment.py",
           "    return _minmax(x).astype(np.float32)", "    return x.astype(np.float32)",
           "tests/test_augment.py"),
    Mutant("brightness with p 0.5", "grata/augment.py",
           "if rng.uniform() < 0.75:  # brightness", "if rng.uniform() < 0.5:  # brightness",
           "tests/test_augment.py"),
    Mutant("gamma range up to 1.5", "grata/augment.py",
           "_low_or_high(rng, (0.5, 1.0), (1.0, 2.0))", "_low_or_high(rng, (0.5, 1.0), (1.0, 1.5))",
           "tests/test_augment.py"),
    Mutant("noise variance used as deviation", "grata/augment.py",
           "rng.normal(0.0, np.sqrt(var), size=x.shape)", "rng.normal(0.0, var, size=x.shape)",
           "tests/test_augment.py"),
    Mutant("gamma not on the inverted image", "grata/augment.py",
           "    inv = -channel\n", "    inv = channel\n",
           "tests/test_augment.py"),
    # -- protocols ------------------------------------------------------------------------
    Mutant("no reset per target domain", "grata/adapt.py",
           'if protocol == "domain" or d_index == 0:', "if d_index == 0:",
           "tests/test_adaptation.py -k protocol"),
    Mutant("no reset per image (episodic)", "grata/adapt.py",
           'if protocol == "episodic":\n                    method.reset()',
           'if protocol == "episodic":\n                    pass',
           "tests/test_adaptation.py -k protocol"),
    Mutant("continual resets per domain", "grata/adapt.py",
           'if protocol == "domain" or d_index == 0:', 'if protocol != "episodic":',
           "tests/test_adaptation.py -k protocol"),
    # -- metrics --------------------------------------------------------------------------
    Mutant("Dice smoothing only below", "grata/metrics.py",
           "return (2.0 * inter + DICE_SMOOTH) / (total + DICE_SMOOTH)",
           "return (2.0 * inter) / (total + DICE_SMOOTH)",
           "tests/test_metrics.py"),
    Mutant("OD and OC swapped", "grata/metrics.py",
           "OD, OC = 0, 1", "OD, OC = 1, 0",
           "tests/test_metrics.py"),
    Mutant("threshold > instead of >=", "grata/metrics.py",
           "return a >= THRESHOLD", "return a > THRESHOLD",
           "tests/test_metrics.py"),
    Mutant("vertical diameter along rows", "grata/metrics.py",
           "return int(m.sum(axis=0).max())", "return int(m.sum(axis=1).max())",
           "tests/test_metrics.py"),
    # -- report ---------------------------------------------------------------------------
    Mutant("mean over targets of the wrong field", "grata/report.py",
           "float(np.mean([r[k] for r in mine]))", "float(np.mean([r['dice_od'] for r in mine]))",
           "tests/test_report.py"),
    Mutant("table OD/OC columns swapped", "grata/report.py",
           "{f(r.get('dice_od'))} {f(r.get('dice_oc'))}",
           "{f(r.get('dice_oc'))} {f(r.get('dice_od'))}",
           "tests/test_report.py"),
    Mutant("partial report marked complete", "grata/report.py",
           '"complete": complete,', '"complete": True,',
           "tests/test_report.py"),
    # -- export lowering ------------------------------------------------------------------
    Mutant("ReLU backward mask out >= 0", "export/lower.py",
           'self.b.op("Greater", [self.env[n], self.zero_after(n, dy)])',
           'self.b.op("GreaterOrEqual", [self.env[n], self.zero_after(n, dy)])',
           "tests/test_export.py -k 'parity_edge and 128'"),
    Mutant("instance-norm backward xhat term dropped", "export/lower.py",
           'self.acc(x, b.op("Add", [ady, b.op("Mul", [xhat, k2])], "d_" + n.name))',
           'self.acc(x, ady)',
           "tests/test_export.py -k 'parity_edge and 128'"),
    Mutant("recomputed xhat not centred", "export/lower.py",
           'neg_mu = b.op("Sub", [self.zero_after(n, dy), sv["mu"]])',
           'neg_mu = self.zero_after(n, dy)',
           "tests/test_export.py -k 'parity_edge and 128'"),
    Mutant("BN backward affine without its shift", "export/lower.py",
           'ady = self.affine(dy, b.reshape(sv["a"], [c]), b.reshape(k1, [c]), c)',
           'ady = self.affine(dy, b.reshape(sv["a"], [c]), b.reshape(k2, [c]), c)',
           "tests/test_export.py -k 'parity_edge and 128'"),
    Mutant("phase tail kernel positions swapped", "export/phase.py",
           "w.permute(1, 2, 3, 0)", "w.permute(1, 3, 2, 0)",
           "tests/test_export.py -k 'parity_edge and 128'"),
    Mutant("heap handed back to glibc's mmap", "runtime/heap.py",
           "{M_MMAP_MAX: 0, M_TRIM_THRESHOLD: KEEP_TRIM_BYTES}",
           "{M_TRIM_THRESHOLD: KEEP_TRIM_BYTES}",
           "tests/test_runtime_heap.py"),
    # -- manifest -------------------------------------------------------------------------
    Mutant("file digests not checked", "export/manifest.py",
           "if verify and file_sha256(f) != digest:", "if False and file_sha256(f) != digest:",
           "tests/test_export.py -k refuses"),
    Mutant("format version not checked", "export/manifest.py",
           "if type(version) is not int or version != FORMAT_VERSION:",
           "if type(version) is not int:",
           "tests/test_export.py -k refuses"),
    # -- data readers ---------------------------------------------------------------------
    Mutant("disc channel == 128", "grata/masks.py",
           "return np.stack([v < 255, v == 0])",
           "return np.stack([v == 128, v == 0])",
           "tests/test_data.py -k mask"),
    Mutant("test rows stream before train rows", "grata/domains.py",
           '_SPLITS = ("train", "test")', '_SPLITS = ("test", "train")',
           "tests/test_data.py -k layout"),
    # -- serving: guards and crash safety ------------------------------------------------
    Mutant("drift bound never trips", "runtime/guards.py",
           "if self.max_drift is not None and not drift <= self.max_drift:",
           "if self.max_drift is not None and drift > 10 * self.max_drift:",
           "tests/test_runtime_adaptive.py -k drift"),
    Mutant("drift restore never falls back to the source", "runtime/guards.py",
           'relative_drift(back["theta"], e.to_numpy(e.theta0)) > self.max_drift:',
           'relative_drift(back["theta"], e.to_numpy(e.theta0)) > 1e9:',
           "tests/test_runtime_adaptive.py -k falls_back"),
    Mutant("second server on an inbox not refused", "runtime/inbox.py",
           'return exclusive_lock(inbox, f"inbox {quote(inbox)} is watched by another grata serve",',
           'return os.open(inbox, os.O_RDONLY) if True else exclusive_lock(inbox, "",',
           "tests/test_runtime_inbox.py -k second_server"),
    Mutant("truncated file rejected before it is stable", "runtime/inbox.py",
           "    stable_at = sig[1] / 1e9 + stable_s",
           "    stable_at = 0.0",
           "tests/test_runtime_inbox.py -k stalled"),
    Mutant("image moved although it changed after reading", "runtime/inbox.py",
           "    if _stat_sig(src) != sig:\n        raise _Leave(\"changed after it was read\", 0.0)",
           "    if False:\n        raise _Leave(\"changed after it was read\", 0.0)",
           "tests/test_runtime_inbox.py -k rewritten"),
    Mutant("result JSON (completion mark) written before the mask", "runtime/inbox.py",
           "write_atomic(outbox / f\"{key}.json\", json_bytes(record))  # the completion mark",
           "pass  # the completion mark",
           "tests/test_runtime_inbox.py -k end_to_end"),
    Mutant("disc scale: horizontal diameter", "grata/disc_scale.py",
           "return float(xs.mean()) + 0.5, float(ys.mean()) + 0.5, float(vertical_diameter(m))",
           "return float(xs.mean()) + 0.5, float(ys.mean()) + 0.5, float(vertical_diameter(m.T))",
           "tests/test_disc_scale.py -k hand_built"),
    Mutant("disc scale: the sidecar ignored", "grata/disc_scale.py",
           "        scale = read_sidecar(checkpoint)\n        if scale is not None:",
           "        scale = None\n        if scale is not None:",
           "tests/test_disc_scale.py -k order"),
    Mutant("scale search: box not centred on the disc", "grata/scale_search.py",
           "    x0 = int(math.floor(cx - s / 2 + 0.5))",
           "    x0 = int(math.floor(cx + 0.5))",
           "tests/test_scale_search.py -k square_box"),
    Mutant("scale search: no zoom search where the model misses", "grata/scale_search.py",
           "        found = _search(look, work, size, seen)",
           "        found = []",
           "tests/test_scale_search.py -k misses_as_given"),
    Mutant("scale search: stream never rejects an outlier", "grata/scale_search.py",
           "        if self.settled and abs(math.log(rel / med)) > math.log(self.outlier):",
           "        if False:",
           "tests/test_scale_search.py -k outliers"),
    Mutant("scale search: matching crops resampled", "grata/scale_search.py",
           "        if _fits_as_given(first, size, scale):",
           "        if False:",
           "tests/test_scale_search.py -k models_scale_is_left"),
    Mutant("scale stage: a stale stream never searches on its own", "grata/scale_stage.py",
           '            if crop_pred is not None and found.how == "stream" and \\\n'
           "                    not prefer_scaled(found, crop_pred, self.scale):",
           "            if False:",
           "tests/test_scale_stage.py -k switches"),
    Mutant("scale search: the one look near the model's band", "grata/scale_search.py",
           "and not _in_band(stream.estimate(), scale, margin=2):",
           "and not _in_band(stream.estimate(), scale):",
           "tests/test_scale_search.py -k near_the_models"),
    Mutant("scale search: an off-centre disc at the model's scale checked again",
           "grata/scale_search.py",
           "            if seen >= MIN_CONFIDENCE:",
           "            if False:",
           "tests/test_scale_stage.py -k off_centre_disc"),
    Mutant("photo scale: no second opinion", "grata/photo_scale.py",
           '        accepted = conf >= _min_confidence() and found.how != "fallback-none"',
           '        accepted = sure and conf >= _min_confidence() and found.how != "fallback-none"',
           "tests/test_photo_scale.py -k second_opinion"),
    Mutant("--paper keeps the disc-scale stage", "grata/cli/scale_args.py",
           'args.scale = "none" if getattr(args, "paper", False) else product.PRODUCT_SCALE',
           "args.scale = product.PRODUCT_SCALE",
           "tests/test_scale_stage.py -k default_and_paper"),
    Mutant("synth: the drift does not move", "grata/synth.py",
           "    return float(drift[0] * (drift[1] / drift[0]) ** t)",
           "    return float(drift[0])",
           "tests/test_synth.py -k drift"),
]


# ---------------------------------------------------------------------- the copy

def _files(root: Path) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root,
                         capture_output=True, check=True).stdout.decode()
    return [f for f in out.split("\0") if f and (root / f).is_file()]


def _shadow(copy: Path, shadow: Path) -> None:
    """The import tree pip would install: package-dir folders linked under their names."""
    config = tomllib.loads((copy / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = config.get("package-dir", {})
    for pkg in sorted(config["packages"], key=lambda p: p.count(".")):
        src = copy / dirs.get(pkg, pkg.replace(".", "/"))
        dst = shadow / pkg.replace(".", "/")
        if dst.exists() or dst.is_symlink():
            if dst.resolve() == src.resolve():
                continue
            dst.unlink()
        dst.mkdir(parents=True)
        for child in src.iterdir():  # link every file, so subpackages can be placed freely
            if child.name != "__pycache__":
                (dst / child.name).symlink_to(child)


def prepare(work: Path) -> tuple[Path, Path]:
    """(copy of the repository, python of a throwaway environment importing the copy)."""
    copy = work / "repo"
    for rel in _files(ROOT):
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        (copy / rel).write_bytes((ROOT / rel).read_bytes())
    shadow = work / "site"
    _shadow(copy, shadow)
    env = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    py = env / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # The copy first, then this interpreter's package folders (their .pth files, and so an
    # editable install of this checkout, are not processed).
    ours = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")
            and Path(p).is_dir()]
    Path(site, "00-mutation.pth").write_text("\n".join([str(shadow), *ours]) + "\n")
    for folder in ours:  # the other .pth hooks of those packages (e.g. cuda-bindings') apply
        for pth in Path(folder).glob("*.pth"):
            if not pth.name.startswith("__editable__"):
                Path(site, pth.name).write_bytes(pth.read_bytes())
    scripts = tomllib.loads((copy / "pyproject.toml").read_text())["project"]["scripts"]
    for name, target in scripts.items():
        module, func = target.split(":")
        script = env / "bin" / name
        script.write_text(f"#!{py}\nimport sys\nfrom {module} import {func}\n"
                          f"sys.exit({func}())\n")
        script.chmod(0o755)
    return copy, py


# ---------------------------------------------------------------------- running

def pytest_run(py: Path, copy: Path, args: list[str], work: Path) -> tuple[str, str]:
    """('passed' | 'failed' | 'error' | 'timeout', first failing test or message)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1",
               GRATA_CACHE=str(work / "cache"), PATH=f"{py.parent}{os.pathsep}{env['PATH']}")
    # Run from an empty folder: the copy's root on sys.path would shadow the mapped
    # packages (its grata/ has no export/ inside).
    run_dir = work / "run"
    run_dir.mkdir(exist_ok=True)
    args = [str(copy / a) if a.startswith("tests/") else a for a in args]
    cmd = [str(py), "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider",
           "-c", str(copy / "pyproject.toml"), "--rootdir", str(copy), *args]
    try:
        proc = subprocess.run(cmd, cwd=run_dir, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return "timeout", f"no result in {TIMEOUT_S} s"
    out = proc.stdout + proc.stderr
    if proc.returncode == 0:
        return "passed", ""
    failed = re.findall(r"^FAILED (\S+)", out, re.M)
    if proc.returncode == 1 and failed:
        return "failed", re.sub(r"^.*?(?=tests/)", "", failed[0])  # the id from the root
    tail = " ".join(out.strip().splitlines()[-3:])
    return "error", f"pytest exit {proc.returncode}: {tail[:200]}"


def baseline(mutants) -> list[list[str]]:
    """One pytest run per test file covering every mutant's selection in it."""
    per_file: dict[str, set | None] = {}
    for m in mutants:
        args = shlex.split(m.tests)
        files = [a for a in args if a.startswith("tests/")]
        expr = args[args.index("-k") + 1] if "-k" in args else None
        for f in files:
            if expr is None or per_file.get(f, set()) is None:
                per_file[f] = None
            else:
                per_file.setdefault(f, set()).add(expr)
    return [[f] if exprs is None else [f, "-k", " or ".join(f"({e})" for e in sorted(exprs))]
            for f, exprs in sorted(per_file.items())]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", dest="pattern", help="only mutants whose name contains this "
                    "(several: 'a|b')")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = ap.parse_args(argv)
    patterns = args.pattern.split("|") if args.pattern else []
    mutants = [m for m in MUTANTS if not patterns or any(p in m.name for p in patterns)]
    if args.list:
        for m in mutants:
            print(f"{m.name:45} {m.file:28} {m.tests}")
        return 0
    names = [m.name for m in MUTANTS]
    if len(set(names)) != len(names):
        raise SystemExit("mutant names must be unique")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="grata-mutants-") as tmp:
        work = Path(tmp)
        copy, py = prepare(work)
        for m in mutants:  # every snippet must be there exactly once before anything runs
            n = (copy / m.file).read_text().count(m.old)
            if n != 1:
                raise SystemExit(f"mutant {m.name!r}: the snippet occurs {n} times in {m.file}")
        for args_ in baseline(mutants):  # each selection passes before it can kill
            status, why = pytest_run(py, copy, args_, work)
            if status != "passed":
                raise SystemExit(f"the unmutated copy fails {' '.join(args_)}: {status} {why}")
        rows = []
        for m in mutants:
            path = copy / m.file
            original = path.read_text()
            path.write_text(original.replace(m.old, m.new))
            t0 = time.monotonic()
            try:
                status, why = pytest_run(py, copy, shlex.split(m.tests), work)
            finally:
                path.write_text(original)
            rows.append((m, status, why, time.monotonic() - t0))
            print(f"{m.name:45} {status:8} {time.monotonic() - t0:6.1f} s  {why}", flush=True)
    width = max(len(m.name) for m in mutants)
    print(f"\n| {'mutant':{width}} | file | killed | by |\n|{'-' * (width + 2)}|---|---|---|")
    for m, status, why, _ in rows:
        killed = "yes" if status in ("failed", "timeout") else "NO"
        print(f"| {m.name:{width}} | {m.file} | {killed} | {why} |")
    survivors = [m.name for m, status, _, _ in rows if status not in ("failed", "timeout")]
    print(f"\n{len(rows) - len(survivors)}/{len(rows)} mutants killed in "
          f"{time.monotonic() - start:.0f} s")
    if survivors:
        print("survived or broken: " + ", ".join(survivors), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
