"""The serve state file (``STATE/state.npz``): a method's `Method.state()` and serving's
own counters, written atomically, read back with the reasons it may be refused.

Layout (format 2): `Method.state()`'s keys as they are (``method``, ``seed``, ``theta``,
``m``, ``v``, ``t``, ``rng``, ``n_seen``, ``events``, ``stats`` for ``ema``; the guard's
``good`` as ``good_theta``, ``good_m``, ``good_v``, ``good_t``; ``rng`` and ``events`` as
JSON text), and serving's: ``format_version``, ``n_images``, ``theta_version``,
``last_key``, ``source_sha256`` (of the artifacts' theta0), ``norm`` (the statistics rule
it was adapted under), ``config`` (JSON), ``gate`` (the gate's window, JSON),
``stats_prev`` (``ema``: the statistics the last image was served at), ``written``, and
``scale_stream`` (JSON: the disc-scale stage's running estimate; absent in older states
and without the stage).

Format 1 (the first release) has the same keys, except that ``n_seen``, ``events`` and
``norm`` may be missing (states written before they existed); it is read as format 2 with
``n_seen`` = ``n_images``, no events and ``sample`` statistics. Any other format is
refused in one line.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np

from grata.atomic import write_atomic
from grata.errors import GrataError
from grata.runtime.record import now_utc

STATE_FILE = "state.npz"
CONFIG_FILE = "config.json"
STATE_FORMAT = 2
READS = (1, 2)
RESET_HINT = "pass --reset to start from the source theta"

# Method.state()'s vocabulary, by how the file stores each field
METHOD_ARRAYS = ("theta", "m", "v")
METHOD_INTS = ("t", "n_seen", "seed")
METHOD_JSON = ("rng", "events")
GOOD_FIELDS = ("theta", "m", "v", "t")


def state_arrays(method_state: dict, serving: dict) -> dict[str, np.ndarray]:
    """The file's arrays of a `Method.state()` and serving's fields (`serving`: n_images,
    theta_version, last_key, source_sha256, norm, config, and optionally gate,
    stats_prev and scale_stream)."""
    st = method_state
    arrays = {"format_version": np.int64(STATE_FORMAT), "method": np.array(st["method"])}
    arrays.update({k: st[k] for k in METHOD_ARRAYS})
    arrays.update({k: np.int64(st[k]) for k in METHOD_INTS})
    arrays.update({k: np.array(json.dumps(st[k])) for k in METHOD_JSON})
    if st.get("stats") is not None:  # ema: the stream statistics
        arrays["stats"] = st["stats"]
    if st.get("good") is not None:
        arrays.update({f"good_{k}": st["good"][k] if k != "t" else np.int64(st["good"][k])
                       for k in GOOD_FIELDS})
    arrays.update({
        "n_images": np.int64(serving["n_images"]),
        "theta_version": np.int64(serving["theta_version"]),
        "last_key": np.array(serving["last_key"] or ""),
        "source_sha256": np.array(serving["source_sha256"]),
        "norm": np.array(serving["norm"]),
        "config": np.array(json.dumps(serving["config"])),
        "written": np.array(now_utc()),
    })
    if serving.get("gate") is not None:
        arrays["gate"] = np.array(json.dumps(serving["gate"]))
    if serving.get("scale_stream") is not None:
        arrays["scale_stream"] = np.array(json.dumps(serving["scale_stream"]))
    if st.get("stats") is not None and serving.get("stats_prev") is not None:
        arrays["stats_prev"] = np.asarray(serving["stats_prev"], np.float32)
    return arrays


def write_state(folder: Path, method_state: dict, serving: dict) -> None:
    """Write ``folder/state.npz`` atomically (see `state_arrays`)."""
    buf = io.BytesIO()
    np.savez(buf, **state_arrays(method_state, serving))
    write_atomic(Path(folder) / STATE_FILE, buf.getvalue())


def read_state(path: Path) -> tuple[dict, dict]:
    """(the `Method.state()` to load, serving's fields) of a state file, format 1 read as
    format 2. An unreadable file or another format is a one-line GrataError."""
    try:
        with np.load(path, allow_pickle=False) as z:
            st = {k: z[k] for k in z.files}
        version = int(st["format_version"])
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
        raise GrataError(f"state {path} cannot be read ({type(exc).__name__}); "
                         f"{RESET_HINT}") from None
    if version not in READS:
        raise GrataError(f"state {path} has format {version}, not {STATE_FORMAT}; "
                         f"{RESET_HINT}")
    if version == 1:  # fields added later in format 1's life
        st.setdefault("n_seen", st.get("n_images"))
        st.setdefault("events", np.array("[]"))
        st.setdefault("norm", np.array("sample"))
    try:
        method_state = {"method": str(st["method"]), "stats": st.get("stats"), "good": None}
        method_state.update({k: st[k] for k in METHOD_ARRAYS})
        # the seed is a record (load_state continues the generator's state instead)
        method_state.update({k: int(st[k]) for k in METHOD_INTS if k != "seed" or k in st})
        method_state.update({k: json.loads(str(st[k])) for k in METHOD_JSON})
        if "good_theta" in st:
            method_state["good"] = {k: st[f"good_{k}"] if k != "t" else int(st[f"good_{k}"])
                                    for k in GOOD_FIELDS}
        serving = {"n_images": int(st["n_images"]), "theta_version": int(st["theta_version"]),
                   "last_key": str(st["last_key"]) or None,
                   "source_sha256": str(st["source_sha256"]), "norm": str(st["norm"]),
                   "gate": json.loads(str(st["gate"])) if "gate" in st else None,
                   "stats_prev": st.get("stats_prev"), "written": str(st.get("written", "")),
                   "scale_stream": json.loads(str(st["scale_stream"]))
                   if "scale_stream" in st else None}
    except (ValueError, KeyError, TypeError) as exc:
        raise GrataError(f"state {path} cannot be read ({type(exc).__name__}); "
                         f"{RESET_HINT}") from None
    return method_state, serving


def check_state(path: Path, method_state: dict, serving: dict, *, source_sha256: str,
                method: str, norm: str, theta_shape: tuple) -> None:
    """Refuse (one line) a state made from other artifacts, by another method, under other
    statistics, or of another theta length."""
    if serving["source_sha256"] != source_sha256:
        raise GrataError(f"state {path} was adapted from another source model (its "
                         f"source theta differs from these artifacts'); {RESET_HINT}")
    if method_state["method"] != method:
        raise GrataError(f"state {path} belongs to method {method_state['method']!r}, not "
                         f"{method!r}; {RESET_HINT}")
    if method != "source" and serving["norm"] != norm:
        raise GrataError(f"state {path} was adapted under {serving['norm']} statistics, not "
                         f"{norm}; {RESET_HINT}")
    st = method_state
    if not (st["theta"].shape == st["m"].shape == st["v"].shape == tuple(theta_shape)):
        raise GrataError(f"state {path}: theta has shape {st['theta'].shape}, the artifacts "
                         f"{tuple(theta_shape)}; {RESET_HINT}")


__all__ = ["CONFIG_FILE", "STATE_FILE", "STATE_FORMAT", "check_state", "read_state",
           "state_arrays", "write_state"]
