"""A short training script run by the upstream Runicorn SDK (in its own virtual environment).

Run as ``<venv>/bin/python upstream_train.py STORAGE PHASE``; it imports the *upstream*
``runicorn`` package, never ours (the harness clears ``PYTHONPATH`` and runs it from a
directory of its own). One script serves every pinned SDK version: the 0.5.x SDK takes
``project=``/``name=`` and writes ``<project>/<name>/runs/<id>/``, the 0.6+ SDK takes
``path=`` and writes ``runs/<path>/<id>/``.

Phases (each prints ``RUN <id> <status>`` per run it made, on stdout):

* ``initial``: two projects, finished and failed runs with metrics, text logs and a PNG;
* ``later``: one more finished run, for the "a later run appears" check;
* ``hold``: a run that stays running: it logs one more step per line read from stdin and
  finishes at end of input (prints ``READY`` once its first steps are on disk);
* ``killed``: a run whose process dies by SIGKILL mid-training (status stays "running").
"""

from __future__ import annotations

import inspect
import math
import os
import signal
import struct
import sys
import zlib

import runicorn as rn

STEPS = 50


def _png(seed: int, size: int = 8) -> bytes:
    """A small deterministic RGB PNG (no imaging library needed)."""
    rows = b"".join(
        b"\x00" + bytes((x * 31 + seed) % 256 for x in range(size * 3)) for _y in range(size)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def _init(storage: str, project: str, name: str):
    params = inspect.signature(rn.init).parameters
    if "path" in params:  # 0.6 and later: one path of any depth
        return rn.init(path=f"{project}/{name}", alias=name, storage=storage)
    return rn.init(project=project, name=name, storage=storage, capture_env=False)


def _train(run, seed: int, steps: int = STEPS, start: int = 0) -> None:
    for step in range(start, start + steps):
        loss = 2.0 * math.exp(-0.05 * step) + 0.01 * ((step * 7 + seed) % 5)
        accuracy = 1.0 - loss / 2.5
        run.log({"loss": round(loss, 6), "accuracy": round(accuracy, 6)}, step=step)
        if step % 10 == 0:
            run.log_text(f"step {step}: loss={loss:.4f}")


def _finished(storage: str, project: str, name: str, seed: int, status: str = "finished"):
    run = _init(storage, project, name)
    _train(run, seed)
    run.log_image("sample", _png(seed), step=STEPS - 1)
    run.log_text(f"done ({status})")
    run.finish(status)
    print(f"RUN {run.id} {status}", flush=True)


def main(storage: str, phase: str) -> None:
    if phase == "initial":
        _finished(storage, "vision", "resnet", 1)
        _finished(storage, "vision", "resnet", 2)
        _finished(storage, "vision", "vit", 3, status="failed")
        _finished(storage, "nlp", "bert", 4)
        _finished(storage, "nlp", "bert", 5, status="failed")
    elif phase == "later":
        _finished(storage, "nlp", "gpt", 6)
    elif phase == "hold":
        run = _init(storage, "vision", "vit")
        _train(run, 7, steps=10)
        print(f"RUN {run.id} running", flush=True)
        print("READY", flush=True)
        step = 10
        for _line in sys.stdin:
            _train(run, 7, steps=1, start=step)
            step += 1
            print(f"STEP {step}", flush=True)
        run.finish("finished")
    elif phase == "killed":
        run = _init(storage, "nlp", "bert")
        _train(run, 8, steps=20)
        print(f"RUN {run.id} running", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    else:
        raise SystemExit(f"unknown phase {phase!r}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
