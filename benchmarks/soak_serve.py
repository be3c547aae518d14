"""Soak run of `grata serve`: many images, random kill -9s, stalled writers and hostile
files; at the end every input must have exactly one complete result or one rejection
with a reason (lost = 0, duplicated = 0).

    python benchmarks/soak_serve.py --images 500 --kills 20 --stalls 40 --hostile-rounds 10

The server is the installed console script `grata serve` in a subprocess (continuous
mode, onnxruntime on the CPU, one thread), on the shipped edge model exported at
`--size` (64 by default) unless `--artifacts` names a folder. Images are fundus-like
pictures (`tests/serve_helpers.py`), hostile files come from the project's one corpus
generator (`tests/hostile.py`, `inbox_files`), so the script runs from a checkout.

Arrivals: most images are written under a hidden temp name and renamed into the inbox;
`--stalls` of them are written in place, half first, then after a pause shorter than
`--stable-for`, the rest. Hostile rounds rename a whole `inbox_files` set into the inbox
(names prefixed by the round). `--kills` times, at random points of the feed, the
server (once up) gets SIGKILL after a random delay, and now and then again while it is
starting; it is restarted at once. After the feed, the inbox is drained, the server
gets SIGTERM, and the outcome of every input is checked, with each served image adapted
exactly once (images_adapted = 1..N). Prints a table (markdown) and exits 1 when any
input is lost, duplicated, or ended other than expected.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the corpus generator and the picture maker

SERVED_HOSTILE = ("a good image", "a 244-byte name", "a newline in the name")
FOLDER = "a folder named like an image"
REASON_KINDS = (  # (pattern in the reason, short kind)
    ("decoding limit", "above the decoding limit"),
    ("not an image file", "not an image file (suffix)"),
    ("not an image format", "not an image format"),
    ("cannot read image", "cannot read image (truncated, empty, corrupt)"),
    ("cannot read:", "unreadable"),
    ("unexpected error", "unexpected error"),
    ("not finite", "non-finite prediction"),
)


def grata_script() -> str:
    here = Path(sys.executable).parent / "grata"
    return str(here) if here.exists() else (shutil.which("grata") or "grata")


def reason_kind(reason: str) -> str:
    for pattern, kind in REASON_KINDS:
        if pattern in reason:
            return kind
    return "other: " + reason[:40]


class Server:
    """`grata serve` in a subprocess; its logs are kept under WORK/logs."""

    def __init__(self, cmd: list[str], logs: Path, env: dict):
        self.cmd, self.logs, self.env = cmd, logs, env
        self.proc: subprocess.Popen | None = None
        self.runs = 0
        self.unexpected_exits: list[int] = []
        logs.mkdir(parents=True, exist_ok=True)

    @property
    def log(self) -> Path:
        return self.logs / f"run{self.runs:03d}.log"

    def start(self) -> None:
        self.runs += 1
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(self.cmd, stdout=f, stderr=subprocess.STDOUT,
                                         env=self.env)

    def started(self) -> bool:
        text = self.log.read_text(errors="replace")
        return "resumed " in text or "starting from the source theta" in text

    def wait_started(self, timeout: float) -> None:
        """Until the server has loaded its model (at most `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        while not self.started() and time.monotonic() < deadline:
            self.check()
            time.sleep(0.05)

    def check(self) -> None:
        """Restart a server that exited on its own (counted: it must never happen)."""
        if self.proc is not None and self.proc.poll() is not None:
            self.unexpected_exits.append(self.proc.returncode)
            self.start()

    def kill(self) -> str:
        """SIGKILL; returns the moment ('while starting' or 'while serving')."""
        self.check()
        when = "while serving" if self.started() else "while starting"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)
        return when

    def term(self, timeout: float = 120) -> int:
        self.check()
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


def make_inputs(work: Path, n_images: int, n_stalls: int, rounds: int, rnd: random.Random,
                seed: int) -> list[dict]:
    """The feed, in arrival order: dicts with name (bytes), data (bytes, None for a
    folder), kind, expect ('served', 'rejected' or 'left alone'), src (staged path)."""
    import numpy as np
    from hostile import inbox_files
    from PIL import Image
    from serve_helpers import fundus

    rng = np.random.default_rng(seed)
    stalled = set(rnd.sample(range(n_images), min(n_stalls, n_images)))
    feed = []
    for i in range(n_images):
        buf = io.BytesIO()
        Image.fromarray(fundus(rng)).save(buf, "PNG")
        feed.append({"name": f"soak{i:04d}.png".encode(), "data": buf.getvalue(),
                     "kind": "stalled writer" if i in stalled else "image",
                     "expect": "served", "src": None})
    for r in range(rounds):
        stage = work / "staging" / f"r{r}"
        for raw, what in inbox_files(stage, seed=seed + r).items():
            src = Path(os.fsdecode(os.path.join(os.fsencode(stage), raw)))
            data = None if src.is_dir() else src.read_bytes()
            expect = ("left alone" if what == FOLDER else
                      "served" if what in SERVED_HOSTILE else "rejected")
            feed.insert(rnd.randrange(len(feed) + 1), {
                "name": b"h%d-" % r + raw, "data": data, "kind": f"hostile: {what}",
                "expect": expect, "src": src})
    return feed


def stalled_write(path: Path, data: bytes, pause: float) -> None:
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        time.sleep(pause)
        f.write(data[len(data) // 2:])


def run_soak(work, artifacts, *, images=500, kills=20, stalls=40, hostile_rounds=10,
             seed=0, stable_for=10.0, drain_timeout=900.0, log=print) -> dict:
    """Run the soak in `work` (a new folder); returns the counts and every problem."""
    from grata.runtime.inbox import display_name

    from grata.decode import quote

    work = Path(work)
    inbox, outbox = work / "inbox", work / "outbox"
    inbox.mkdir(parents=True)
    rnd = random.Random(seed)
    t_start = time.monotonic()
    feed = make_inputs(work, images, stalls, hostile_rounds, rnd, seed)
    kill_after = set(rnd.sample(range(1, len(feed)), min(kills, len(feed) - 1)))
    cmd = [grata_script(), "serve", "--inbox", str(inbox), "--outbox", str(outbox),
           "--artifacts", str(artifacts), "--predictor", "onnxruntime", "--device", "cpu",
           "--threads", "1", "--poll", "0.1", "--settle", "0.5",
           "--stable-for", str(stable_for)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    server = Server(cmd, work / "logs", env)
    faults: Counter = Counter()
    writers: list[threading.Thread] = []
    server.start()
    try:
        for idx, item in enumerate(feed):
            dest = Path(os.fsdecode(os.path.join(os.fsencode(inbox), item["name"])))
            if item["src"] is not None:  # a hostile file or folder: renamed in whole
                os.rename(item["src"], dest)
                faults[item["kind"]] += 1
            elif item["kind"] == "stalled writer":
                pause = rnd.uniform(0.5, max(0.6, min(2.5, 0.6 * stable_for)))
                t = threading.Thread(target=stalled_write, args=(dest, item["data"], pause))
                t.start()
                writers.append(t)
                faults["stalled writer"] += 1
            else:
                tmp = inbox / f".soak-{idx}.tmp"
                tmp.write_bytes(item["data"])
                os.rename(tmp, dest)
            if idx in kill_after:
                server.wait_started(120)
                time.sleep(rnd.uniform(0.0, 1.5))  # mostly in the middle of an image
                faults[f"kill -9 {server.kill()}"] += 1
                server.start()
                if rnd.random() < 0.3:  # now and then again before it is up
                    time.sleep(rnd.uniform(0.05, 1.5))
                    faults[f"kill -9 {server.kill()}"] += 1
                    server.start()
            elif rnd.random() < 0.2:
                time.sleep(rnd.uniform(0.0, 0.15))
            server.check()
        for t in writers:
            t.join(60)
        log(f"soak: fed {len(feed)} inputs in {time.monotonic() - t_start:.0f} s; draining")
        deadline = time.monotonic() + drain_timeout
        while any(p.is_file() and not p.name.startswith(".") for p in inbox.iterdir()):
            if time.monotonic() > deadline:
                break
            server.check()
            time.sleep(0.5)
        rc = server.term()
    finally:
        if server.proc is not None and server.proc.poll() is None:  # a failed run
            server.proc.kill()
            server.proc.wait()
    wall = time.monotonic() - t_start
    return {**verify(feed, inbox, outbox, server, quote, display_name), "faults": faults,
            "final_rc": rc, "wall_s": round(wall, 1), "images": images, "kills": kills,
            "stalls": stalls, "hostile_rounds": hostile_rounds, "seed": seed,
            "stable_for": stable_for, "server_runs": server.runs}


def verify(feed, inbox: Path, outbox: Path, server: Server, quote, display_name) -> dict:
    """Every input's outcome from the files alone."""
    records: dict = {}
    incomplete = 0
    for p in outbox.glob("*.json"):
        rec = json.loads(p.read_text())
        records.setdefault((rec["image"], rec["input_sha256"]), []).append(rec)
        if not all((outbox / f).is_file() for f in rec["files"].values()):
            incomplete += 1
    rejections: dict = {}
    for p in (inbox / "rejected").glob("*.reason.txt"):
        fields = dict(line.split(": ", 1) for line in p.read_text().splitlines())
        rejections.setdefault((fields["image"], fields["sha256"]), []).append(fields)
    outcomes, problems, reasons = Counter(), [], Counter()
    for item in feed:
        name = os.fsdecode(item["name"])
        if item["data"] is None:  # the folder
            here = (inbox / name).is_dir()
            outcomes["left alone" if here else "moved"] += 1
            if not here:
                problems.append(f"{quote(name)}: a folder was moved")
            continue
        sha = hashlib.sha256(item["data"]).hexdigest()
        served = records.get((display_name(name), sha), [])
        rejected = rejections.get((quote(name), sha), [])
        n = len(served) + len(rejected)
        outcome = ("lost" if n == 0 else "duplicated" if n > 1 else
                   "served" if served else "rejected")
        outcomes[outcome] += 1
        if rejected:
            reasons[reason_kind(rejected[0]["reason"])] += 1
        if outcome != item["expect"]:
            problems.append(f"{quote(name)} ({item['kind']}): {outcome}, expected "
                            f"{item['expect']}")
        if os.path.lexists(inbox / name):
            problems.append(f"{quote(name)}: still in the inbox")
    logs = "".join(p.read_text(errors="replace") for p in sorted(server.logs.iterdir()))
    odd = [ln for ln in logs.splitlines() if ln and not ln.startswith(("grata serve:", "'",
                                                                        '"'))]
    if odd:
        problems.append(f"{len(odd)} log lines not from the server's format, e.g. "
                        f"{odd[0][:80]!r}")
    if "Traceback" in logs:
        problems.append("a traceback in the server's log")
    if server.unexpected_exits:
        problems.append(f"the server exited on its own {len(server.unexpected_exits)} "
                        f"times (codes {server.unexpected_exits})")
    if incomplete:
        problems.append(f"{incomplete} results without their mask or overlay")
    temps = [p for p in outbox.iterdir() if p.name.endswith(".tmp")]
    if temps:
        problems.append(f"{len(temps)} temp files left in the outbox")
    # with a checkpoint per image, the results' images_adapted are exactly 1..N: an image
    # adapted twice (a result lost to a crash, then adapted again) leaves a gap
    adapted = sorted(r["images_adapted"] for v in records.values() for r in v)
    once = adapted == list(range(1, len(adapted) + 1))
    if not once:
        gaps = sorted(set(range(1, max(adapted, default=0) + 1)) - set(adapted))
        problems.append(f"images_adapted is not 1..{len(adapted)} (missing {gaps[:8]}): "
                        f"an image adapted twice or an update lost")
    n_json = sum(len(v) for v in records.values())
    recovered = sum(r["recovered"] for v in records.values() for r in v)
    return {"inputs": sum(1 for i in feed if i["data"] is not None),
            "results_out": n_json, "recovered": recovered,
            "rejections_out": sum(len(v) for v in rejections.values()),
            "outcomes": outcomes, "rejections": reasons,
            "lost": outcomes["lost"], "duplicated": outcomes["duplicated"],
            "adapted_once": once,
            "problems": problems}


def table(r: dict) -> str:
    """The result as a markdown table."""
    kinds = sorted(k for k in r["faults"])
    rows = [("cases tried (kinds of input and fault)", len(kinds) + 1),
            ("faults injected", sum(r["faults"].values()))]
    rows += [(f"- {k}", r["faults"][k]) for k in kinds]
    rows += [("server runs (starts after kills included)", r["server_runs"]),
             ("inputs (files; the hostile folder aside)", r["inputs"]),
             ("results out (complete JSON + mask + overlay)", r["results_out"]),
             ("- of which recovered after a kill (prediction only)", r["recovered"]),
             ("rejections (with a reason)", r["rejections_out"])]
    rows += [(f"- {k}", v) for k, v in sorted(r["rejections"].items())]
    rows += [("hostile folder left alone", r["outcomes"]["left alone"]),
             ("lost", r["lost"]), ("duplicated", r["duplicated"]),
             ("every served image adapted exactly once (images_adapted = 1..N)",
              "yes" if r["adapted_once"] else "NO"),
             ("ended other than expected, or other problems", len(r["problems"])),
             ("final SIGTERM exit code", r["final_rc"]), ("wall time (s)", r["wall_s"])]
    return "| | count |\n| --- | --- |\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=500, help="good images (default 500)")
    ap.add_argument("--kills", type=int, default=20, help="kill -9 points (default 20)")
    ap.add_argument("--stalls", type=int, default=40, help="stalled writers (default 40)")
    ap.add_argument("--hostile-rounds", type=int, default=10,
                    help="sets of tests/hostile.py inbox files (default 10)")
    ap.add_argument("--stable-for", type=float, default=10.0,
                    help="the server's --stable-for (default 10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=64, help="model size (default 64)")
    ap.add_argument("--artifacts", type=Path, help="artifact folder (default: the shipped "
                    "edge model exported at --size)")
    ap.add_argument("--work", type=Path, help="work folder (default: a new temp folder, "
                    "removed after a clean run)")
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args(argv)
    if args.artifacts is None:
        from grata.artifacts import default_artifacts
        args.artifacts, which = default_artifacts(args.size)
        print(f"soak: model: {which} at {args.size}", flush=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="grata-soak-"))
    r = run_soak(work / "run", args.artifacts, images=args.images, kills=args.kills,
                 stalls=args.stalls, hostile_rounds=args.hostile_rounds, seed=args.seed,
                 stable_for=args.stable_for)
    print(table(r))
    for p in r["problems"][:20]:
        print("problem:", p)
    if args.json:
        args.json.write_text(json.dumps(r, indent=1, default=dict) + "\n")
    ok = not r["problems"] and r["lost"] == 0 and r["duplicated"] == 0
    if ok and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    elif not ok:
        print(f"soak: kept {work} for inspection", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
