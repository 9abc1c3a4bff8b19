"""RunSelection: which of a server's runs a sync mirrors (``--project``, ``--include`` …).

A lab server holds many people's projects; most users want a few of them. A selection is
applied to the manifest's runs before the diff (and to the legacy walk's), so runs outside
it are never fetched, and to the cached runs a full manifest no longer lists, so they are
never deleted either. It matches each run by its **key**:

* ``project/name/run_id`` for the project-name layout (``<root>/<project>/<name>/runs/<id>``);
* ``runs/<path…>/run_id`` for the runs-path layout (``<root>/runs/<path…>/<id>``, SDK 0.6),
  ``runs/run_id`` when the path is empty -- the run's directory under the root.

Rules (all given criteria must hold):

* ``projects``: the run's project is one of them; a runs-path run matches a name equal to
  the first component of its path (``runs/vision/resnet/<id>`` is in project ``vision``),
  and every runs-path run matches ``runs``;
* ``include``: the key matches one of the globs (none given: everything is included);
* ``exclude``: the key matches none of them;
* ``since``: the run was created or updated within that many seconds before the sync;
* ``max_runs``: of the runs the rules above keep, the most recently updated ones.

Globs: ``*`` matches within one component (never ``/``), ``**`` across components, ``?``
one character other than ``/``, ``[abc]`` a set. A glob that matches the leading
components of a key selects the whole subtree: ``vision`` and ``vision/*`` both select
every run of project ``vision``. Matching is case-sensitive, as paths on the server are.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import orjson

from runicorn.format.layout import RUNS_DIRNAME
from runicorn.format.models import ExperimentEntry, SyncManifest

__all__ = ["RunSelection", "parse_duration", "run_key"]

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_duration(text: str) -> float:
    """Seconds in ``text``: a number of seconds, or parts such as ``90s``, ``30m``, ``12h``,
    ``7d``, ``2w``, ``1h30m``. Raises ``ValueError`` naming the accepted forms."""
    value = text.strip().lower().replace(" ", "")
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
        pos = 0
        for match in _DURATION.finditer(value):
            if match.start() != pos:
                break
            seconds = max(seconds, 0.0) + float(match.group(1)) * _UNITS[match.group(2)]
            pos = match.end()
        if pos != len(value) or not value:
            seconds = -1.0
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError(
            f"not a duration: {text!r}; write seconds or parts like 90s, 30m, 12h, 7d, 2w, 1h30m"
        )
    return seconds


def run_key(project: str, name: str, run_id: str) -> str:
    """The key a selection's globs match: the run's directory, less the project-name
    layout's ``runs`` level (see the module docstring)."""
    if project == RUNS_DIRNAME:
        return f"{RUNS_DIRNAME}/{name}/{run_id}" if name else f"{RUNS_DIRNAME}/{run_id}"
    return f"{project}/{name}/{run_id}"


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """The compiled form of one glob; a match of leading components selects the subtree."""
    if not pattern or pattern.startswith("/") or "\0" in pattern:
        raise ValueError(
            f"bad glob {pattern!r}: write it relative to the root, e.g. 'vision/*' or "
            "'runs/**/seed-*'"
        )
    out: list[str] = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = pattern.find("]", i + 2)
            if end < 0:
                raise ValueError(f"bad glob {pattern!r}: '[' without a closing ']'")
            body = pattern[i + 1 : end]
            negate = body.startswith("!")
            body = body[1:] if negate else body
            escaped = body.replace("\\", "\\\\").replace("^", "\\^")
            out.append(f"[{'^/' if negate else ''}{escaped}]")
            i = end + 1
            continue
        else:
            out.append(re.escape(char))
        i += 1
    return re.compile("".join(out).rstrip("/") + "(?:/.*)?", re.DOTALL)


def _strings(values: str | Iterable[str] | None, what: str) -> tuple[str, ...]:
    if values is None:
        return ()
    if isinstance(values, str):
        values = (values,)
    result = tuple(values)
    for value in result:
        if not isinstance(value, str) or not value:
            raise ValueError(f"{what} must be non-empty strings, got {value!r}")
    return result


@dataclass(frozen=True)
class RunSelection:
    """Which runs a sync mirrors; the empty selection (the default) is every run."""

    projects: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    since: float | None = None
    """Seconds: runs created or updated this long before the sync, or later."""
    max_runs: int | None = None
    """At most this many runs, the most recently updated first."""
    _include: tuple[re.Pattern[str], ...] = field(default=(), repr=False, compare=False)
    _exclude: tuple[re.Pattern[str], ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "projects", _strings(self.projects, "projects"))
        for project in self.projects:
            if "/" in project or project.startswith("."):
                raise ValueError(f"a project is one visible name without '/', got {project!r}")
        object.__setattr__(self, "include", _strings(self.include, "include globs"))
        object.__setattr__(self, "exclude", _strings(self.exclude, "exclude globs"))
        object.__setattr__(self, "_include", tuple(_glob_regex(g) for g in self.include))
        object.__setattr__(self, "_exclude", tuple(_glob_regex(g) for g in self.exclude))
        if self.since is not None and not 0 <= self.since < float("inf"):
            raise ValueError(f"since must be a number of seconds >= 0, got {self.since!r}")
        if self.max_runs is not None and self.max_runs < 0:
            raise ValueError(f"max_runs must be >= 0, got {self.max_runs}")

    @classmethod
    def of(
        cls,
        projects: str | Sequence[str] | None = None,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        since: float | str | None = None,
        max_runs: int | None = None,
    ) -> RunSelection:
        """A selection from API keywords: ``since`` in seconds or a duration (``"7d"``)."""
        seconds = parse_duration(since) if isinstance(since, str) else since
        return cls(
            projects=_strings(projects, "projects"),
            include=_strings(include, "include globs"),
            exclude=_strings(exclude, "exclude globs"),
            since=None if seconds is None else float(seconds),
            max_runs=max_runs,
        )

    @property
    def is_everything(self) -> bool:
        """Whether this selection keeps every run (nothing to filter)."""
        return (
            not (self.projects or self.include or self.exclude)
            and self.since is None
            and self.max_runs is None
        )

    @property
    def fingerprint(self) -> str:
        """A stable text of the criteria: a sync applying a manifest under another selection
        cannot trust the no-change check made under this one."""
        if self.is_everything:
            return ""
        return orjson.dumps(
            {
                "projects": sorted(set(self.projects)),
                "include": sorted(set(self.include)),
                "exclude": sorted(set(self.exclude)),
                "since": self.since,
                "max_runs": self.max_runs,
            },
            option=orjson.OPT_SORT_KEYS,
        ).decode()

    def with_limits(self, *, since: float | None, max_runs: int | None) -> RunSelection:
        """This selection narrowed by a window and a cap (the tighter of each)."""
        if since is not None and self.since is not None:
            since = min(since, self.since)
        if max_runs is not None and self.max_runs is not None:
            max_runs = min(max_runs, self.max_runs)
        return RunSelection(
            self.projects,
            self.include,
            self.exclude,
            self.since if since is None else since,
            self.max_runs if max_runs is None else max_runs,
        )

    # -- matching ----------------------------------------------------------------------------

    def may_select_project(self, project: str) -> bool:
        """Whether any run under the top-level directory ``project`` can be selected (the
        legacy walk skips the others without listing them)."""
        if self.projects and project != RUNS_DIRNAME and project not in self.projects:
            return False
        return not any(regex.fullmatch(project) for regex in self._exclude)

    def selects_key(self, project: str, name: str, run_id: str) -> bool:
        """Whether the run's project and key pass ``projects``, ``include`` and ``exclude``."""
        if self.projects:
            if project == RUNS_DIRNAME:
                first = name.split("/", 1)[0]
                if RUNS_DIRNAME not in self.projects and first not in self.projects:
                    return False
            elif project not in self.projects:
                return False
        if not (self._include or self._exclude):
            return True
        key = run_key(project, name, run_id)
        if self._include and not any(regex.fullmatch(key) for regex in self._include):
            return False
        return not any(regex.fullmatch(key) for regex in self._exclude)

    def selects(
        self,
        project: str,
        name: str,
        run_id: str,
        created_at: float,
        updated_at: float,
        now: float,
    ) -> bool:
        """Whether one run passes every criterion but ``max_runs`` (which ranks runs)."""
        if self.since is not None and max(created_at, updated_at) < now - self.since:
            return False
        return self.selects_key(project, name, run_id)

    def restrict(
        self, manifest: SyncManifest, now: float | None = None
    ) -> tuple[SyncManifest, int]:
        """The manifest with only the selected runs, and how many runs were left out.

        The manifest itself is returned when everything is selected; otherwise a copy with
        the same header and the selected experiments (statistics follow them).
        """
        if self.is_everything:
            return manifest, 0
        kept = self.select_runs(manifest.experiments, now)
        if len(kept) == len(manifest.experiments):
            return manifest, 0
        narrowed = dataclasses.replace(manifest, experiments=kept)
        return narrowed, len(manifest.experiments) - len(kept)

    def select_runs(
        self, experiments: Sequence[ExperimentEntry], now: float | None = None
    ) -> list[ExperimentEntry]:
        """The selected experiments, in their order."""
        if self.is_everything:
            return list(experiments)
        when = time.time() if now is None else now
        kept = [
            exp
            for exp in experiments
            if self.selects(exp.project, exp.name, exp.run_id, exp.created_at, exp.updated_at, when)
        ]
        if self.max_runs is not None and len(kept) > self.max_runs:
            ranked = sorted(
                kept,
                key=lambda e: (-e.updated_at, -e.created_at, run_key(e.project, e.name, e.run_id)),
            )
            chosen = {id(exp) for exp in ranked[: self.max_runs]}
            kept = [exp for exp in kept if id(exp) in chosen]
        return kept
