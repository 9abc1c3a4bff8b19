"""A deterministic, seeded sample lab in either Runicorn run layout.

Tests, benchmarks and ``runicorn demo`` need realistic trees -- many runs, append-only logs
of realistic size, running and finished runs, soft-deleted runs, lock files -- that are
byte-identical (mtimes included) for the same ``seed`` and ``now``, so that manifests,
active selections and sync results can be predicted exactly. :func:`build_sample_lab`
creates such a tree and :func:`training_step` advances it the way a live lab changes
between two syncs, reporting exactly what it changed.

File contents are built with bulk string operations over pre-formatted pools (not one
Python call per JSON field) so that a 1,000-run lab of ~150 MB builds in a few seconds.

By default runs are laid out as the API document has them (``<project>/<name>/runs/<run_id>``,
SDK 0.5); ``layout="runs-path"`` writes them as SDK 0.6+ does (``runs/<project>/<name>/<run_id>``,
a ``path`` in meta.json, the SQLite index files at the root, deleted runs moved to
``runs/.recycle``).

Run ``python -m runicorn.demo.sample_lab ROOT --runs N --scale S --seed K`` to build one by hand.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import shutil
import struct
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import cycle, islice
from pathlib import Path

import orjson

from runicorn.format.layout import (
    DELETED_MARKER,
    EXPERIMENTS_METADATA_FILENAME,
    INDEX_FILE_PREFIX,
    LAYOUT_PROJECT_NAME,
    LAYOUT_RUNS_PATH,
    LOCK_SUFFIX,
    RECYCLE_DIRNAME,
    RUNS_DIRNAME,
    is_hidden,
    is_run_dir_listing,
    is_synced_file,
    run_prefix,
)

__all__ = [
    "DEFAULT_ACTIVE_WINDOW",
    "LabInfo",
    "RunInfo",
    "StepInfo",
    "build_sample_lab",
    "training_step",
]

logger = logging.getLogger(__name__)

DEFAULT_ACTIVE_WINDOW = 3600
"""The manifest generator's default active window (seconds); the lab keeps clear of it."""

EVENTS = "events.jsonl"
LOGS = "logs.txt"
META = "meta.json"
STATUS = "status.json"
SUMMARY = "summary.json"
ENVIRONMENT = "environment.json"
ARTIFACTS_CREATED = "artifacts_created.json"
MEDIA_DIRNAME = "media"

_PROJECTS: dict[str, tuple[str, ...]] = {
    "vision": ("resnet50_baseline", "vit_small", "convnext_tiny", "detr_coco", "unet_seg"),
    "nlp": ("bert_finetune", "gpt2_small", "t5_summarize", "lora_llama", "tokenizer_ablation"),
    "rl": ("ppo_cartpole", "sac_halfcheetah", "dqn_atari", "impala_procgen"),
    "audio": ("wav2vec_ctc", "whisper_tiny_ft", "melgan_vocoder"),
    "tabular": ("xgboost_sweep", "tabnet_baseline", "ft_transformer"),
    "genai": ("ddpm_cifar10", "sd_lora_faces", "vqvae_codes", "flow_matching"),
    "robotics": ("bc_pick_place", "diffusion_policy", "sim2real_grasp"),
    "speech": ("conformer_asr", "tacotron2_tts", "hubert_pretrain"),
}
_PROJECT_ORDER = tuple(_PROJECTS)

_TAGS = ("baseline", "best", "ablation", "sweep", "debug", "paper", "to-review", "lr-search")
_HOSTS = (*(f"gpu-node-{i:02d}" for i in range(1, 9)), "dgx-a100-2", "lab-ws-17")
_PYTHONS = ("3.10.14", "3.11.9", "3.12.3")
_PLATFORMS = (
    "Linux-5.15.0-105-generic-x86_64-with-glibc2.35",
    "Linux-6.5.0-35-generic-x86_64-with-glibc2.35",
    "Linux-4.18.0-513.el8.x86_64-x86_64-with-glibc2.28",
)

# Every events line ends with this constant field, so that a half-written last line left by
# ``training_step(partial_line=True)`` can be completed later from the fragment alone.
_EVENT_SUFFIX = ', "split": "train"}\n'
_EVENT_HEAD = '{"step": %d, "time": %.3f, %s'
_LOG_LINE = "[+%10.2fs] %s"
_POOL_SIZE = 4096

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_HEADER = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
_MIN_MEDIA_BYTES = 48

_DAY = 86400.0
_HISTORY_DAYS = 30.0
_FINISHED_MARGIN = 2 * 3600.0
"""Non-running runs ended at least this long ago: well outside the default active window."""
_RUNNING_RECENT = 300.0
"""Running runs last appended within this many seconds before ``now``."""

_JSON_OPTS = orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS


@dataclass(frozen=True)
class RunInfo:
    """One run directory the lab holds, with what a manifest of it should say."""

    path: Path
    rel: str
    """``project/name/runs/run_id`` or ``runs/<path>/run_id`` (POSIX, no trailing slash);
    ``runs/.recycle/run_id`` for a soft-deleted run of a runs-path lab."""
    project: str
    """``runs`` in a runs-path lab (as a manifest lists such runs)."""
    name: str
    """The run's path (``project/name``) in a runs-path lab."""
    run_id: str
    status: str
    created_at: float
    updated_at: float
    """Newest mtime among the run's synced files."""
    deleted: bool
    files: dict[str, int]
    """Every file of the run directory (locks and marker included), relative path -> size."""

    @property
    def synced_files(self) -> dict[str, int]:
        """The files a full manifest lists for this run (no locks, no ``.deleted``)."""
        return {p: s for p, s in self.files.items() if is_synced_file(p)}


@dataclass
class LabInfo:
    """What :func:`build_sample_lab` built: every run, the clock it used and the totals."""

    root: Path
    seed: int
    scale: float
    now: float
    runs: list[RunInfo]
    tags: dict[str, list[str]]
    total_files: int = 0
    total_bytes: int = 0
    total_dirs: int = 0

    @property
    def run_dirs(self) -> list[Path]:
        """Every run directory, soft-deleted ones included, in build order."""
        return [r.path for r in self.runs]

    @property
    def listed_runs(self) -> list[RunInfo]:
        """Runs a full manifest lists (not soft-deleted)."""
        return [r for r in self.runs if not r.deleted]

    @property
    def running_runs(self) -> list[RunInfo]:
        return [r for r in self.runs if r.status == "running" and not r.deleted]

    @property
    def listed_files(self) -> int:
        """Number of file entries a full manifest of this lab holds."""
        return sum(len(r.synced_files) for r in self.listed_runs)

    @property
    def listed_bytes(self) -> int:
        """Sum of sizes a full manifest of this lab records (all logs end with a newline)."""
        return sum(sum(r.synced_files.values()) for r in self.listed_runs)

    def active_runs(self, window: float = DEFAULT_ACTIVE_WINDOW) -> list[RunInfo]:
        """Runs an active manifest with this window selects (spec §3.7)."""
        cutoff = self.now - window
        return [r for r in self.listed_runs if r.status == "running" or r.updated_at >= cutoff]


@dataclass
class StepInfo:
    """Exactly what one :func:`training_step` changed; paths are relative POSIX strings."""

    now: float
    appended: dict[str, int] = field(default_factory=dict)
    """Append-only file -> bytes appended (a completed or newly left fragment included)."""
    partial: dict[str, int] = field(default_factory=dict)
    """Append-only file -> length of the incomplete last line it now ends with."""
    completed: list[str] = field(default_factory=list)
    """Files whose previously half-written last line this step completed."""
    rewritten: list[str] = field(default_factory=list)
    """Files rewritten in place (status.json, summary.json)."""
    finished: list[str] = field(default_factory=list)
    """Run dirs whose status changed from running to a final status."""
    added: list[str] = field(default_factory=list)
    """New run dirs (running)."""
    added_files: dict[str, int] = field(default_factory=dict)
    """Every synced file of the new runs -> size."""
    removed: list[str] = field(default_factory=list)
    """Run dirs deleted from disk."""
    soft_deleted: list[str] = field(default_factory=list)
    """Run dirs that got a ``.deleted`` marker."""
    touched_locks: list[str] = field(default_factory=list)

    def changed_files(self) -> set[str]:
        """Synced files whose content a sync after this step must move (new or changed)."""
        return set(self.appended) | set(self.rewritten) | set(self.added_files)

    def gone_runs(self) -> set[str]:
        """Run dirs a full manifest no longer lists after this step."""
        return set(self.removed) | set(self.soft_deleted)


# --------------------------------------------------------------------------- pools


@dataclass(frozen=True)
class _Pools:
    """Pre-formatted line endings, so that one line costs one ``%`` and no float maths."""

    event_tails: tuple[str, ...]
    event_tail_len: float
    log_messages: tuple[str, ...]
    log_message_len: float


@functools.lru_cache(maxsize=8)
def _pools(seed: int) -> _Pools:
    rng = random.Random(f"runicorn-sample-lab:{seed}:pools")
    tails = []
    for i in range(_POOL_SIZE):
        progress = (i % 1024) / 1024.0
        loss = 2.3 * math.exp(-4.0 * progress) + 0.05 + 0.04 * rng.random()
        acc = min(0.999, 0.1 + 0.85 * (1.0 - math.exp(-5.0 * progress)) + 0.02 * rng.random())
        lr = 3e-4 * (0.5 + 0.5 * math.cos(math.pi * progress))
        grad = 0.2 + 2.0 * rng.random() * (1.0 - 0.7 * progress)
        tails.append(
            f'"loss": {loss:.6f}, "acc": {acc:.4f}, "lr": {lr:.3e}, '
            f'"grad_norm": {grad:.3f}{_EVENT_SUFFIX}'
        )
    messages = []
    for i in range(1024):
        kind = rng.random()
        step = rng.randrange(1, 200_000)
        if kind < 0.55:
            msg = (
                f"INFO  step {step}: loss={0.05 + 2 * rng.random():.4f} "
                f"acc={rng.random():.4f} lr={3e-4 * rng.random():.2e} "
                f"throughput={200 + 800 * rng.random():.1f} samples/s"
            )
        elif kind < 0.7:
            msg = (
                f"INFO  epoch {1 + i % 90} validation: val_loss={0.1 + rng.random():.4f} "
                f"val_acc={0.5 + 0.5 * rng.random():.4f}"
            )
        elif kind < 0.8:
            mb = rng.randrange(40, 900)
            msg = f"INFO  saved checkpoint checkpoints/ckpt_{step:07d}.pt ({mb} MB)"
        elif kind < 0.9:
            used = 4 + 70 * rng.random()
            msg = f"DEBUG cuda:{rng.randrange(8)} memory {used:.1f} GiB / 80.0 GiB reserved"
        elif kind < 0.97:
            msg = (
                f"WARN  gradient norm {5 + 20 * rng.random():.2f} exceeds clip value 1.0 "
                f"at step {step}"
            )
        else:
            msg = f"WARN  dataloader worker {rng.randrange(16)} slow: {rng.random() * 3:.2f}s/batch"
        messages.append(msg + "\n")
    return _Pools(
        event_tails=tuple(tails),
        event_tail_len=sum(map(len, tails)) / len(tails),
        log_messages=tuple(messages),
        log_message_len=sum(map(len, messages)) / len(messages),
    )


def _event_lines(
    pools: _Pools, offset: int, first_step: int, count: int, t0: float, dt: float
) -> str:
    """``count`` complete events lines, steps ``first_step..``, times ``t0 + i*dt``."""
    tails = islice(cycle(pools.event_tails), offset % _POOL_SIZE, offset % _POOL_SIZE + count)
    times = [t0 + i * dt for i in range(count)]
    steps = range(first_step, first_step + count)
    return "".join(map(_EVENT_HEAD.__mod__, zip(steps, times, tails, strict=False)))


def _log_lines(pools: _Pools, offset: int, count: int, e0: float, dt: float) -> str:
    """``count`` log lines stamped with elapsed seconds from ``e0``."""
    n = len(pools.log_messages)
    msgs = islice(cycle(pools.log_messages), offset % n, offset % n + count)
    elapsed = [e0 + i * dt for i in range(count)]
    return "".join(map(_LOG_LINE.__mod__, zip(elapsed, msgs, strict=False)))


# --------------------------------------------------------------------------- files


def _write(path: Path | str, data: bytes, mtime: float) -> int:
    """Create (or truncate) ``path`` with ``data`` and set a deterministic mtime."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    _set_mtime(path, mtime)
    return len(data)


def _append(path: Path | str, data: bytes, mtime: float) -> int:
    """Append as the SDK does (a plain O_APPEND write) and set a deterministic mtime."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    _set_mtime(path, mtime)
    return len(data)


def _set_mtime(path: Path | str, mtime: float) -> None:
    ns = _ns(mtime)
    os.utime(path, ns=(ns, ns))


def _ns(t: float) -> int:
    return round(t * 1_000_000) * 1000


def _json(obj: object) -> bytes:
    return orjson.dumps(obj, option=_JSON_OPTS) + b"\n"


def _stamp(t: float) -> str:
    return time.strftime("%Y%m%d_%H%M%S", time.gmtime(t))


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _png(rng: random.Random, size: int) -> bytes:
    """PNG signature and a valid IHDR chunk, then noise: looks like an image to sniffers."""
    ihdr = struct.pack(">IIBBBBB", rng.randrange(64, 1024), rng.randrange(64, 1024), 8, 6, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr
    chunk += struct.pack(">I", zlib.crc32(chunk[4:]))
    head = _PNG_SIGNATURE + chunk
    return head + rng.randbytes(max(0, size - len(head)))


def _jpeg(rng: random.Random, size: int) -> bytes:
    return _JPEG_HEADER + rng.randbytes(max(0, size - len(_JPEG_HEADER)))


# --------------------------------------------------------------------------- one run


@dataclass
class _RunPlan:
    """The structural facts of one run, decided before any content is written."""

    project: str
    name: str
    run_id: str
    status: str
    created_at: float
    ended_at: float | None
    last_write: float
    """mtime of the append-only logs (end of training, or recently for running runs)."""
    deleted_at: float | None
    keep_locks: bool


def _write_run(
    root: Path, plan: _RunPlan, pools: _Pools, rng: random.Random, scale: float
) -> RunInfo:
    """Write every file of one run from its plan; ``rng`` only drives content and sizes.

    A plan of project ``runs`` is a runs-path run (its name is the path), written as SDK 0.6+
    writes one; a soft-deleted one is moved to ``runs/.recycle``, as its viewer does."""
    runs_path = plan.project == RUNS_DIRNAME
    rel = run_prefix(plan.project, plan.name, plan.run_id)[:-1]
    run_dir = root / rel
    os.mkdir(run_dir)
    d = str(run_dir) + os.sep
    files: dict[str, int] = {}
    created, last = plan.created_at, plan.last_write
    running = plan.status == "running"
    end = plan.ended_at if plan.ended_at is not None else last
    duration = max(1.0, last - created)

    meta: dict[str, object] = {"id": plan.run_id}
    if runs_path:
        meta |= {"path": plan.name, "alias": None}
    else:
        meta |= {"project": plan.project, "name": plan.name}
    meta |= {
        "created_at": round(created, 3),
        "python": rng.choice(_PYTHONS),
        "platform": rng.choice(_PLATFORMS),
        "hostname": rng.choice(_HOSTS),
        "pid": rng.randrange(1000, 4_000_000),
    }
    files[META] = _write(d + META, _json(meta), created)

    status: dict[str, object] = {
        "status": plan.status,
        "started_at": round(created, 3),
        "ended_at": None if running else round(end, 3),
    }
    if plan.status == "failed":
        status["error"] = rng.choice(
            ("CUDA out of memory", "NaN loss detected", "KeyError: 'labels'", "Killed")
        )
    files[STATUS] = _write(d + STATUS, _json(status), created if running else end)

    # Sizes: log-uniform between the documented bounds, times scale, never empty.
    events_target = math.exp(rng.uniform(math.log(20_000), math.log(400_000))) * scale
    logs_target = math.exp(rng.uniform(math.log(5_000), math.log(100_000))) * scale
    n_events = max(1, round(events_target / (pools.event_tail_len + 37)))
    n_logs = max(1, round(logs_target / (pools.log_message_len + 14)))

    ev_dt = duration / n_events
    events = _event_lines(pools, rng.randrange(_POOL_SIZE), 1, n_events, created + ev_dt, ev_dt)
    files[EVENTS] = _write(d + EVENTS, events.encode(), last)

    header = (
        f"[+{0.0:10.2f}s] INFO  runicorn run {plan.run_id} ({plan.project}/{plan.name}) "
        f"started {_iso(created)} on {meta['hostname']}\n"
    )
    body = _log_lines(pools, rng.randrange(1 << 16), max(0, n_logs - 1), 1.0, duration / n_logs)
    footer = ""
    if not running:
        footer = f"[+{duration:10.2f}s] INFO  run {plan.status} after {duration:.1f}s\n"
    files[LOGS] = _write(d + LOGS, (header + body + footer).encode(), last)

    summary_t = last if not running else max(created, last - rng.uniform(0.0, 120.0))
    files[SUMMARY] = _write(d + SUMMARY, _json(_summary(rng, n_events, running)), summary_t)

    if rng.random() < 0.5:
        env = _environment(rng, meta)
        files[ENVIRONMENT] = _write(d + ENVIRONMENT, _json(env), created + 1.0)
    if not running and rng.random() < 0.3:
        arts = _artifacts(rng, plan)
        files[ARTIFACTS_CREATED] = _write(d + ARTIFACTS_CREATED, _json(arts), end)

    os.mkdir(d + MEDIA_DIRNAME)
    media_last = created
    for k in range(rng.randint(2, 4)):
        size = max(_MIN_MEDIA_BYTES, round(rng.uniform(1024, 6144) * scale))
        t = created + duration * (k + 1) / 5.0
        media_last = max(media_last, t)
        if k % 3 == 2:
            mname = f"{MEDIA_DIRNAME}/samples_epoch{k + 1:03d}.jpg"
            files[mname] = _write(d + mname, _jpeg(rng, size), t)
        else:
            kind = ("loss_curve", "confusion_matrix")[k % 2]
            mname = f"{MEDIA_DIRNAME}/{kind}_epoch{k + 1:03d}.png"
            files[mname] = _write(d + mname, _png(rng, size), t)
    _set_mtime(d + MEDIA_DIRNAME, media_last)

    # Every synced file's mtime is one of these; the newest decides active selection.
    synced_newest = max(created, last, summary_t, media_last, created if running else end)

    if running or plan.keep_locks:
        for base in (EVENTS, LOGS):
            files[base + LOCK_SUFFIX] = _write(d + base + LOCK_SUFFIX, b"", last)
    dir_mtime = created
    if plan.deleted_at is not None:
        marker = {"deleted_at": round(plan.deleted_at, 3), "reason": "user"}
        files[DELETED_MARKER] = _write(d + DELETED_MARKER, _json(marker), plan.deleted_at)
        dir_mtime = plan.deleted_at
    _set_mtime(run_dir, dir_mtime)
    if runs_path and plan.deleted_at is not None:
        recycle = root / RUNS_DIRNAME / RECYCLE_DIRNAME
        recycle.mkdir(exist_ok=True)
        rel = f"{RUNS_DIRNAME}/{RECYCLE_DIRNAME}/{plan.run_id}"
        os.rename(run_dir, root / rel)
        run_dir = root / rel

    return RunInfo(
        path=run_dir,
        rel=rel,
        project=plan.project,
        name=plan.name,
        run_id=plan.run_id,
        status=plan.status,
        created_at=created,
        updated_at=synced_newest,
        deleted=plan.deleted_at is not None,
        files=dict(sorted(files.items())),
    )


def _summary(rng: random.Random, steps: int, running: bool) -> dict[str, object]:
    best = 0.05 + 0.5 * rng.random()
    out: dict[str, object] = {
        "best_loss": round(best, 6),
        "final_loss": round(best * (1 + 0.2 * rng.random()), 6),
        "best_acc": round(0.5 + 0.49 * rng.random(), 4),
        "total_steps": steps,
        "epochs": 1 + steps // 500,
    }
    if running:
        out["last_step"] = steps
    for key in rng.sample(("val_loss", "val_acc", "f1", "bleu", "reward_mean", "psnr"), 2):
        out[key] = round(rng.random() * 40, 4)
    return out


def _environment(rng: random.Random, meta: dict[str, object]) -> dict[str, object]:
    return {
        "python": meta["python"],
        "platform": meta["platform"],
        "git": {
            "commit": rng.randbytes(20).hex(),
            "branch": rng.choice(("main", "dev", "exp/lr-sweep")),
            "dirty": rng.random() < 0.3,
        },
        "packages": {
            "torch": rng.choice(("2.1.2", "2.2.1", "2.3.0")),
            "numpy": rng.choice(("1.26.4", "2.0.0")),
            "runicorn": "0.4.0",
        },
        "gpus": [f"NVIDIA A100-SXM4-80GB #{i}" for i in range(rng.choice((1, 2, 4, 8)))],
    }


def _artifacts(rng: random.Random, plan: _RunPlan) -> list[dict[str, object]]:
    return [
        {
            "name": f"{plan.name}-{kind}",
            "type": kind,
            "version": rng.randrange(1, 12),
            "size_bytes": rng.randrange(1 << 20, 1 << 31),
        }
        for kind in rng.sample(("model", "dataset", "checkpoint", "config"), rng.randint(1, 2))
    ]


# --------------------------------------------------------------------------- the lab


def _experiments(seed: int, projects: int) -> list[tuple[str, str]]:
    """The (project, name) pairs of a lab: 2-5 experiment names per project."""
    rng = random.Random(f"runicorn-sample-lab:{seed}:experiments")
    out: list[tuple[str, str]] = []
    for p in range(projects):
        base = _PROJECT_ORDER[p % len(_PROJECT_ORDER)]
        project = base if p < len(_PROJECT_ORDER) else f"{base}{p // len(_PROJECT_ORDER) + 1}"
        names = _PROJECTS[base]
        out.extend(
            (project, n) for n in sorted(rng.sample(names, rng.randint(2, min(5, len(names)))))
        )
    return out


def _new_run_id(rng: random.Random, created_at: float, taken: set[str]) -> str:
    stamp = _stamp(created_at)
    while True:
        run_id = f"{stamp}_{rng.getrandbits(24):06x}"
        if run_id not in taken:
            taken.add(run_id)
            return run_id


def build_sample_lab(
    root: Path,
    runs: int = 100,
    *,
    seed: int = 0,
    scale: float = 1.0,
    projects: int | None = None,
    now: float | None = None,
    layout: str = LAYOUT_PROJECT_NAME,
) -> LabInfo:
    """Build a lab of ``runs`` runs under ``root`` (which must be missing or empty).

    ``layout`` is ``"project-name"`` (``<project>/<name>/runs/<run_id>``) or ``"runs-path"``
    (``runs/<project>/<name>/<run_id>``, as SDK 0.6+ writes; with its root index files).
    The same seed gives the same runs, contents and mtimes in either layout.

    The same ``seed`` and ``now`` give a byte-identical tree with identical mtimes; ``scale``
    multiplies the sizes of events, logs and media without changing which runs exist. With
    the default clock every non-running run ended over two hours before ``now`` and every
    running run appended within the last five minutes, so the active set is the running set.
    """
    if runs < 0:
        raise ValueError(f"runs must be >= 0, got {runs}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"sample lab root is not empty: {root}")
    root.mkdir(parents=True, exist_ok=True)
    if now is None:
        now = time.time()
    if projects is None:
        projects = min(len(_PROJECT_ORDER), 3 + runs // 500)
    if projects < 1:
        raise ValueError(f"projects must be >= 1, got {projects}")
    if layout not in (LAYOUT_PROJECT_NAME, LAYOUT_RUNS_PATH):
        raise ValueError(
            f"layout must be {LAYOUT_PROJECT_NAME!r} or {LAYOUT_RUNS_PATH!r}, got {layout!r}"
        )

    started = time.perf_counter()
    experiments = _experiments(seed, projects)
    if layout == LAYOUT_RUNS_PATH:
        experiments = [(RUNS_DIRNAME, f"{project}/{name}") for project, name in experiments]
    plans = _plan_runs(seed, runs, now, experiments)
    pools = _pools(seed)

    created_dirs = _make_experiment_dirs(root, experiments)
    infos: list[RunInfo] = []
    for i, plan in enumerate(plans):
        rng = random.Random(f"runicorn-sample-lab:{seed}:run:{i}")
        infos.append(_write_run(root, plan, pools, rng, scale))

    tag_rng = random.Random(f"runicorn-sample-lab:{seed}:tags")
    tags: dict[str, list[str]] = {}
    for plan in plans:
        if tag_rng.random() < 0.3:
            tags[plan.run_id] = sorted(tag_rng.sample(_TAGS, tag_rng.randint(1, 3)))
    meta_path = root / EXPERIMENTS_METADATA_FILENAME
    tag_time = max((p.created_at for p in plans if p.run_id in tags), default=now - _DAY)
    meta_bytes = _write(meta_path, _json({k: {"tags": v} for k, v in tags.items()}), tag_time)

    index_files, index_bytes = 0, 0
    if layout == LAYOUT_RUNS_PATH:
        index_files, index_bytes = _write_index_files(root, seed, tag_time)
    _settle_dir_mtimes(root, experiments, plans)

    info = LabInfo(root=root, seed=seed, scale=scale, now=now, runs=infos, tags=tags)
    info.total_files = 1 + index_files + sum(len(r.files) for r in infos)
    info.total_bytes = meta_bytes + index_bytes + sum(sum(r.files.values()) for r in infos)
    info.total_dirs = created_dirs + 2 * len(infos)
    if (root / RUNS_DIRNAME / RECYCLE_DIRNAME).is_dir():
        info.total_dirs += 1
    logger.debug(
        "built sample lab %s: %d runs, %d files, %d bytes in %.2fs",
        root,
        len(infos),
        info.total_files,
        info.total_bytes,
        time.perf_counter() - started,
    )
    return info


def _plan_runs(
    seed: int, runs: int, now: float, experiments: list[tuple[str, str]]
) -> list[_RunPlan]:
    """Decide every run's identity, status and clock; independent of ``scale``."""
    rng = random.Random(f"runicorn-sample-lab:{seed}:plan")
    taken: set[str] = set()
    plans = []
    for _ in range(runs):
        project, name = experiments[rng.randrange(len(experiments))]
        roll = rng.random()
        duration = rng.uniform(600.0, 12 * 3600.0)
        age = rng.uniform(0.0, _HISTORY_DAYS * _DAY)
        lock_roll, delete_roll, delete_after = rng.random(), rng.random(), rng.random()
        if roll < 0.15:
            status = "running"
            last_write = now - rng.uniform(1.0, _RUNNING_RECENT)
            created = last_write - duration
            ended = None
        else:
            status = "finished" if roll < 0.8 else "failed" if roll < 0.92 else "interrupted"
            ended = now - _FINISHED_MARGIN - age
            created = ended - duration
            last_write = ended - rng.uniform(0.0, 5.0)
        deleted_at = None
        if ended is not None and delete_roll < 0.04:  # not running
            deleted_at = ended + (now - _FINISHED_MARGIN - ended) * delete_after
        plans.append(
            _RunPlan(
                project=project,
                name=name,
                run_id=_new_run_id(rng, created, taken),
                status=status,
                created_at=created,
                ended_at=ended,
                last_write=last_write,
                deleted_at=deleted_at,
                keep_locks=status != "running" and lock_roll < 0.25,
            )
        )
    return plans


def _write_index_files(root: Path, seed: int, mtime: float) -> tuple[int, int]:
    """The SDK 0.6+ SQLite index (``runicorn.db`` with its WAL and shared memory) as opaque
    seeded bytes: never synced, so only their presence matters. Returns (files, bytes)."""
    rng = random.Random(f"runicorn-sample-lab:{seed}:index")
    sizes = {"": 16384, "-wal": 8232, "-shm": 32768}
    total = 0
    for suffix, size in sizes.items():
        total += _write(root / (INDEX_FILE_PREFIX + suffix), rng.randbytes(size), mtime)
    return len(sizes), total


def _experiment_dirs(project: str, name: str) -> list[str]:
    """The directories (relative, outermost first) that hold an experiment's run dirs."""
    parts = run_prefix(project, name, "_").split("/")[:-2]
    return ["/".join(parts[: k + 1]) for k in range(len(parts))]


def _make_experiment_dirs(root: Path, experiments: Iterable[tuple[str, str]]) -> int:
    count = 0
    for project, name in experiments:
        for rel in _experiment_dirs(project, name):
            sub = root / rel
            if not sub.exists():
                sub.mkdir()
                count += 1
    return count


def _settle_dir_mtimes(
    root: Path, experiments: list[tuple[str, str]], plans: list[_RunPlan]
) -> None:
    """Give experiment-level directories deterministic mtimes (their last entry's birth)."""
    latest: dict[tuple[str, str], float] = {}
    for p in plans:
        key = (p.project, p.name)
        latest[key] = max(latest.get(key, p.created_at), p.created_at)
    fallback = min((p.created_at for p in plans), default=0.0)
    newest: dict[str, float] = {}
    for project, name in experiments:
        t = latest.get((project, name), fallback)
        for rel in _experiment_dirs(project, name):
            newest[rel] = max(newest.get(rel, t), t)
    for rel, t in newest.items():
        _set_mtime(root / rel, t)


# --------------------------------------------------------------------------- live lab


@dataclass
class _LiveRun:
    rel: str
    path: Path
    status: str
    created_at: float


def _scan_runs(root: Path) -> tuple[list[_LiveRun], list[tuple[str, str]]]:
    """Non-deleted runs under ``root`` and the experiments that exist, sorted; runs-path
    experiments are ``("runs", path)``."""
    runs: list[_LiveRun] = []
    experiments: list[tuple[str, str]] = []
    _scan_run_paths(root / RUNS_DIRNAME, "", runs, experiments)
    for project in _sorted_dirs(root):
        if project == RUNS_DIRNAME:
            continue
        for name in _sorted_dirs(root / project):
            runs_dir = root / project / name / RUNS_DIRNAME
            if not runs_dir.is_dir():
                continue
            experiments.append((project, name))
            for run_id in _sorted_dirs(runs_dir):
                path = runs_dir / run_id
                if (path / DELETED_MARKER).exists():
                    continue
                status, created = _read_status(path)
                rel = f"{project}/{name}/{RUNS_DIRNAME}/{run_id}"
                runs.append(_LiveRun(rel=rel, path=path, status=status, created_at=created))
    return runs, experiments


def _scan_run_paths(
    directory: Path, path: str, runs: list[_LiveRun], experiments: list[tuple[str, str]]
) -> None:
    """The runs-path part of :func:`_scan_runs`: a directory holding run directories is an
    experiment (as the lab writes them: never runs beside path components)."""
    found = False
    for name in _sorted_dirs(directory):
        child = directory / name
        if is_run_dir_listing(os.listdir(child)):
            found = True
            if (child / DELETED_MARKER).exists():
                continue
            status, created = _read_status(child)
            rel = run_prefix(RUNS_DIRNAME, path, name)[:-1]
            runs.append(_LiveRun(rel=rel, path=child, status=status, created_at=created))
        else:
            _scan_run_paths(child, f"{path}/{name}" if path else name, runs, experiments)
    if found or (path and not any(_sorted_dirs(directory))):
        experiments.append((RUNS_DIRNAME, path))


def _sorted_dirs(path: Path) -> Iterator[str]:
    try:
        names = sorted(e.name for e in os.scandir(path) if e.is_dir(follow_symlinks=False))
    except OSError:
        return iter(())
    return (n for n in names if not is_hidden(n))


def _read_status(run_dir: Path) -> tuple[str, float]:
    try:
        status = orjson.loads((run_dir / STATUS).read_bytes())
        return str(status.get("status", "unknown")), float(status.get("started_at") or 0.0)
    except (OSError, ValueError, TypeError, AttributeError):
        return "unknown", 0.0


def _tail_state(path: Path) -> tuple[int, float, bytes]:
    """(last complete step, its time, trailing fragment) of an events file."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - 8192))
        tail = f.read()
    cut = tail.rfind(b"\n")
    fragment = tail[cut + 1 :]
    complete = tail[: cut + 1].splitlines()
    for line in reversed(complete):
        try:
            obj = orjson.loads(line)
            return int(obj["step"]), float(obj["time"]), fragment
        except (ValueError, KeyError, TypeError):
            continue
    return 0, 0.0, fragment


def _completion(fragment: bytes) -> bytes:
    """The bytes that finish a half-written events line left by ``partial_line=True``."""
    suffix = _EVENT_SUFFIX.encode()
    for m in range(len(suffix) - 1, -1, -1):
        if fragment.endswith(suffix[:m]):
            return suffix[m:]
    return suffix  # pragma: no cover - m == 0 always matches


def training_step(
    root: Path,
    *,
    seed: int,
    now: float | None = None,
    partial_line: bool = False,
    new_runs: int | None = None,
) -> StepInfo:
    """Advance a lab the way a live lab changes between two syncs; report what changed.

    Running runs get complete lines appended to events.jsonl and logs.txt (after touching
    their lock files, as the SDK does); about a third of them finish (status.json and
    summary.json rewritten in place), others get a fresh summary.json; 1-2 new running runs
    appear (``new_runs`` to choose); one old finished run is soft-deleted or removed. With
    ``partial_line`` one running run's events.jsonl is left ending in a half-written line,
    which the next step completes first. Same tree, ``seed`` and ``now``: same result.
    """
    root = Path(root)
    if now is None:
        now = time.time()
    rng = random.Random(f"runicorn-sample-lab:step:{seed}")
    pools = _pools(seed)
    info = StepInfo(now=now)
    runs, experiments = _scan_runs(root)
    running = [r for r in runs if r.status == "running"]
    finishing = {r.rel for r in rng.sample(running, (len(running) + 1) // 3)}

    continuing: list[_LiveRun] = []
    for run in running:
        _advance_run(run, rng, pools, now, info)
        if run.rel in finishing:
            _finish_run(run, rng, now, info)
        else:
            continuing.append(run)
            if rng.random() < 0.5:
                _rewrite(run.path / SUMMARY, _summary(rng, rng.randrange(10, 9999), True), now)
                info.rewritten.append(f"{run.rel}/{SUMMARY}")

    old = [r for r in runs if r.status not in ("running", "unknown")]
    if old:
        victim = rng.choice(old)
        if rng.random() < 0.5:
            marker = {"deleted_at": round(now, 3), "reason": "user"}
            _write(victim.path / DELETED_MARKER, _json(marker), now)
            _set_mtime(victim.path, now)
            if victim.rel.startswith(f"{RUNS_DIRNAME}/"):  # the viewer's recycle bin
                recycle = root / RUNS_DIRNAME / RECYCLE_DIRNAME
                recycle.mkdir(exist_ok=True)
                os.rename(victim.path, recycle / victim.path.name)
            info.soft_deleted.append(victim.rel)
        else:
            shutil.rmtree(victim.path)
            _set_mtime(victim.path.parent, now)
            info.removed.append(victim.rel)

    count = rng.randint(1, 2) if new_runs is None else new_runs
    added = _add_runs(root, rng, pools, now, count, experiments, info)

    if partial_line:
        targets = continuing or added
        if targets:
            _leave_partial(targets[0], rng, pools, now, info)

    for lst in (info.rewritten, info.finished, info.added, info.removed, info.soft_deleted):
        lst.sort()
    info.touched_locks.sort()
    info.completed.sort()
    logger.debug(
        "training step on %s: %d files appended, %d rewritten, %d runs added, %d gone",
        root,
        len(info.appended),
        len(info.rewritten),
        len(info.added),
        len(info.gone_runs()),
    )
    return info


def _advance_run(
    run: _LiveRun, rng: random.Random, pools: _Pools, now: float, info: StepInfo
) -> None:
    """Append complete lines to a running run's logs, completing a dangling fragment first."""
    events = run.path / EVENTS
    logs = run.path / LOGS
    for base in (EVENTS, LOGS):
        lock = run.path / (base + LOCK_SUFFIX)
        if not lock.exists():
            lock.touch()
            _set_mtime(run.path, now)
        _set_mtime(lock, now)
        info.touched_locks.append(f"{run.rel}/{base}{LOCK_SUFFIX}")

    last_step, last_time, fragment = _tail_state(events)
    head = b""
    if fragment:
        head = _completion(fragment)
        info.completed.append(f"{run.rel}/{EVENTS}")
        try:  # the completed line carries the next step
            done = orjson.loads(fragment + head)
            last_step, last_time = int(done["step"]), float(done["time"])
        except (ValueError, KeyError, TypeError):
            head = b"\n"  # not our fragment: end it; a viewer skips the bad line
    n = rng.randint(3, 40)
    t0 = max(last_time, now - 60.0)
    dt = max(0.001, (now - t0) / (n + 1))
    body = _event_lines(pools, rng.randrange(_POOL_SIZE), last_step + 1, n, t0 + dt, dt)
    info.appended[f"{run.rel}/{EVENTS}"] = _append(events, head + body.encode(), now)

    k = rng.randint(1, 10)
    elapsed0 = max(0.0, now - 60.0 - run.created_at)
    text = _log_lines(pools, rng.randrange(1 << 16), k, elapsed0, 60.0 / k)
    info.appended[f"{run.rel}/{LOGS}"] = _append(logs, text.encode(), now)


def _finish_run(run: _LiveRun, rng: random.Random, now: float, info: StepInfo) -> None:
    roll = rng.random()
    final = "finished" if roll < 0.7 else "failed" if roll < 0.85 else "interrupted"
    status: dict[str, object] = {
        "status": final,
        "started_at": round(run.created_at, 3),
        "ended_at": round(now, 3),
    }
    if final == "failed":
        status["error"] = "NaN loss detected"
    _rewrite(run.path / STATUS, status, now)
    _rewrite(run.path / SUMMARY, _summary(rng, rng.randrange(10, 9999), False), now)
    info.rewritten += [f"{run.rel}/{STATUS}", f"{run.rel}/{SUMMARY}"]
    info.finished.append(run.rel)


def _rewrite(path: Path, obj: object, mtime: float) -> None:
    """Rewrite in place (truncate and write, not rename), as the SDK does."""
    _write(path, _json(obj), mtime)


def _add_runs(
    root: Path,
    rng: random.Random,
    pools: _Pools,
    now: float,
    count: int,
    experiments: list[tuple[str, str]],
    info: StepInfo,
) -> list[_LiveRun]:
    if not experiments and count:
        experiments = [("demo", "quickstart")]
        _make_experiment_dirs(root, experiments)
    taken = {
        e.name
        for project, name in experiments
        for e in os.scandir(root / run_prefix(project, name, "_")[:-3])
    }
    added = []
    for _ in range(count):
        project, name = rng.choice(experiments)
        created = now - rng.uniform(20.0, 90.0)
        plan = _RunPlan(
            project=project,
            name=name,
            run_id=_new_run_id(rng, created, taken),
            status="running",
            created_at=created,
            ended_at=None,
            last_write=now,
            deleted_at=None,
            keep_locks=True,
        )
        run_rng = random.Random(f"runicorn-sample-lab:step:{rng.getrandbits(64)}")
        ri = _write_run(root, plan, pools, run_rng, scale=0.02)
        _set_mtime(ri.path, now)
        _set_mtime(ri.path.parent, now)
        info.added.append(ri.rel)
        for p, s in ri.synced_files.items():
            info.added_files[f"{ri.rel}/{p}"] = s
        added.append(_LiveRun(rel=ri.rel, path=ri.path, status="running", created_at=created))
    return added


def _leave_partial(
    run: _LiveRun, rng: random.Random, pools: _Pools, now: float, info: StepInfo
) -> None:
    """Append the start of one more events line, cut inside its constant last field."""
    events = run.path / EVENTS
    last_step, _, fragment = _tail_state(events)
    if fragment:  # pragma: no cover - runs we append to always end with a newline here
        return
    line = _event_lines(pools, rng.randrange(_POOL_SIZE), last_step + 1, 1, now, 0.0)
    cut = len(line) - len(_EVENT_SUFFIX) + rng.randrange(len(_EVENT_SUFFIX) - 1)
    piece = line[:cut].encode()
    rel = f"{run.rel}/{EVENTS}"
    _append(events, piece, now)
    if rel in info.added_files:  # a new run: its file is new, not appended to
        info.added_files[rel] += len(piece)
    else:
        info.appended[rel] = info.appended.get(rel, 0) + len(piece)
    info.partial[rel] = len(piece)


# --------------------------------------------------------------------------- script


def _main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m runicorn.demo.sample_lab",
        description="Build a deterministic sample lab in a Runicorn run layout.",
    )
    parser.add_argument("root", type=Path, help="directory to create (must be missing or empty)")
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies file sizes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--projects", type=int, default=None)
    parser.add_argument(
        "--now", type=float, default=None, help="clock (epoch s), for repeatability"
    )
    parser.add_argument(
        "--layout",
        choices=(LAYOUT_PROJECT_NAME, LAYOUT_RUNS_PATH),
        default=LAYOUT_PROJECT_NAME,
        help="project-name: <project>/<name>/runs/<run_id> (SDK 0.5); "
        "runs-path: runs/<project>/<name>/<run_id> (SDK 0.6+)",
    )
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    lab = build_sample_lab(
        args.root,
        args.runs,
        seed=args.seed,
        scale=args.scale,
        projects=args.projects,
        now=args.now,
        layout=args.layout,
    )
    elapsed = time.perf_counter() - t0
    print(f"root:          {lab.root}")
    print(
        f"runs:          {len(lab.runs)} ({len(lab.running_runs)} running, "
        f"{len(lab.runs) - len(lab.listed_runs)} soft-deleted)"
    )
    print(f"files:         {lab.total_files} ({lab.listed_files} in a full manifest)")
    print(f"bytes:         {lab.total_bytes} ({lab.total_bytes / 1e6:.1f} MB)")
    print(f"tagged runs:   {len(lab.tags)}")
    print(f"now:           {lab.now:.3f}")
    print(f"built in:      {elapsed:.2f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
