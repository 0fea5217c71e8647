"""Search journal: every evaluation appended to a JSONL file, so an interrupted search resumes without
re-evaluating (qslm.md section 3, last paragraph).

Line 1 is a header ``{"journal": "qslm-search", "version", "fingerprint", "meta", "created"}``; every further
line is one evaluation ``{"key", "plan", "metric", "memory_bytes", "examples", "time"}`` (``key`` =
``QuantPlan.key()``; ``examples``: the per-example statistics the metric was computed from,
``{statistic: [value per example]}``, or null for an evaluate function that gives metrics only), written and
flushed (fsync) as soon as the evaluator returns; the statistics are stored exactly (JSON round-trips float64),
so a resumed run recomputes identical bootstrap intervals (:mod:`qslm_jax.qslm.uncertainty`). ``meta``
describes everything the metric depends on (model / checkpoint, task and split, quantizer options, evaluation
protocol with the data source by its resolved path, so any spelling of one data directory fits); the SHA-256 of
it and the format version is the fingerprint, and opening a journal whose fingerprint differs is refused.
Version 1 journals (no per-example statistics) are refused with a message: their intervals cannot be
recomputed. Their default path differs from version 2's (the fingerprint covers the version), so a search left
at its default journal re-evaluates its candidates into a new file and leaves the old one untouched. Search
constraints (``const_a``, ``const_m``, alpha, ``--confidence``) do not change a metric, so they need not be in
``meta``: one journal then serves reruns with other constraints. A corrupt last line (a write cut short by a
crash) is dropped and the file repaired; a corrupt line anywhere else is an error.

Files that are not journals are refused and never modified (only a missing or empty path becomes a new
journal). A new journal is created atomically (header written to a temporary file, then hard-linked into place,
which fails if another process got there first), so two processes starting on one path never write two
headers; reading, repairing and appending hold an exclusive ``flock`` on the file, so a second process waits
for the first's write to finish rather than interleaving with it. In a multi-process run only process 0 reads and
writes the file; the others hold its entries (:mod:`qslm_jax.qslm.distributed`).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qslm_jax.errors import ConfigError, DataError
from qslm_jax.qslm.distributed import is_main_process, same_on_every_process, share_from_main
from qslm_jax.qslm.uncertainty import Examples, check_examples
from qslm_jax.quant.plan import QuantPlan

JOURNAL_TAG = "qslm-search"
JOURNAL_VERSION = 2  # 2: per-example statistics ("examples") in every evaluation


def _canonical(meta: Mapping[str, Any]) -> Any:
    return json.loads(json.dumps(dict(meta), sort_keys=True, default=str))


def fingerprint(meta: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of ``meta`` and :data:`JOURNAL_VERSION` as canonical JSON (sorted keys; non-JSON values
    such as paths as strings)."""
    text = json.dumps([JOURNAL_VERSION, _canonical(meta)], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def _example_set(examples: Mapping[str, Any]) -> tuple[tuple[str, ...], int]:
    return tuple(sorted(examples)), len(next(iter(examples.values())))


class Journal:
    """Append-only record of evaluations ``plan -> (metric, memory_bytes)`` for one fingerprinted setup."""

    def __init__(self, path: str | Path, meta: Mapping[str, Any]):
        self.path = Path(path)
        self.meta = _canonical(meta)
        self.fingerprint = fingerprint(meta)
        self._entries: dict[str, dict[str, Any]] = {}
        self._example_set: tuple[tuple[str, ...], int] | None = None  # (statistics, examples) of every entry
        self.repaired = False  # True when a cut-short last line was dropped on opening
        self._load()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def metric(self, key: str) -> float | None:
        """The journaled metric of the plan with ``key``, or None if it was never evaluated."""
        entry = self._entries.get(key)
        return None if entry is None else float(entry["metric"])

    def examples(self, key: str) -> dict[str, Any] | None:
        """The journaled per-example statistics of the plan with ``key`` (float64 arrays), or None if it was
        never evaluated or journaled without them."""
        entry = self._entries.get(key)
        return None if entry is None or entry.get("examples") is None else check_examples(entry["examples"], key)

    def entries(self) -> list[dict[str, Any]]:
        """Every journaled evaluation (one dict per plan, in the order first written)."""
        return list(self._entries.values())

    def record(self, plan: QuantPlan, metric: float, memory_bytes: int, examples: Examples | None = None) -> None:
        """Append one evaluation (with its per-example statistics, if any) and flush it to disk."""
        stored = None
        if examples is not None:
            checked = check_examples(examples, plan.key())
            self._check_example_set(_example_set(checked), f"plan {plan.key()}")
            stored = {k: v.tolist() for k, v in checked.items()}
        entry = {"key": plan.key(), "plan": plan.to_dict(), "metric": float(metric),
                 "memory_bytes": int(memory_bytes), "examples": stored, "time": _now()}
        self._append(entry)
        self._entries[entry["key"]] = entry

    def _append(self, obj: Mapping[str, Any]) -> None:
        if not is_main_process():
            return
        line = (json.dumps(obj, sort_keys=True) + "\n").encode("utf-8")
        with self._locked("ab") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    @contextlib.contextmanager
    def _locked(self, mode: str):
        """The journal file opened in ``mode`` under an exclusive ``flock`` (waits for another holder)."""
        with self.path.open(mode) as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield handle
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _header_line(self) -> str:
        return json.dumps({"journal": JOURNAL_TAG, "version": JOURNAL_VERSION, "fingerprint": self.fingerprint,
                           "meta": self.meta, "created": _now()}, sort_keys=True) + "\n"

    def _create(self) -> None:
        """Write a new journal holding only the header, atomically; no-op if another process created it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(self._header_line())
                handle.flush()
                os.fsync(handle.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(temporary, self.path)
        finally:
            os.unlink(temporary)

    def _load(self) -> None:
        """Read (create, repair) the file in process 0; every other process of a multi-process run takes
        process 0's entries (:func:`~qslm_jax.qslm.distributed.share_from_main`) and never writes. Every
        process first checks that all have the same setup (weights, data, protocol: the fingerprint)."""
        if not same_on_every_process(self.fingerprint):
            raise ConfigError(f"the processes' evaluation setups differ (this one's fingerprint "
                              f"{self.fingerprint[:12]}, meta {self.meta}): every process needs the same weights, "
                              f"data and flags")
        if is_main_process():
            self._read_file()
        self._entries = share_from_main(self._entries)

    def _read_file(self) -> None:
        if self.path.exists() and not self.path.is_file():
            raise ConfigError(f"journal path {self.path} exists and is not a file: pass a journal file path")
        if not self.path.exists():
            self._create()
        with self._locked("r+b") as handle:
            text = handle.read().decode("utf-8", errors="replace")
            if not text:  # an empty file holds nothing to lose: make it a journal
                handle.write(self._header_line().encode("utf-8"))
                handle.flush()
                os.fsync(handle.fileno())
                return
            lines = text.split("\n")
            if lines[-1] == "":
                lines.pop()
            try:
                header = json.loads(lines[0])
            except json.JSONDecodeError:
                header = None
            self._check_header(header)
            records = [header]
            for number, line in enumerate(lines[1:], start=2):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    if number < len(lines):
                        raise ConfigError(
                            f"journal {self.path} line {number} is not valid JSON ({err}); only the last line "
                            f"may be cut short by a crash. Fix or delete that line, or delete the journal to "
                            f"start over."
                        ) from err
                    self.repaired = True
            for number, entry in enumerate(records[1:], start=2):
                if not isinstance(entry, dict) or not {"key", "metric", "examples"} <= entry.keys():
                    raise ConfigError(f"journal {self.path} line {number}: expected an evaluation with 'key', "
                                      f"'metric' and 'examples', found {str(entry)[:200]}; fix or delete that "
                                      f"line.")
                if entry["examples"] is not None:
                    try:
                        examples = check_examples(entry["examples"], f"journal {self.path} line {number}")
                    except DataError as err:
                        raise ConfigError(f"{err}; fix or delete that line.") from err
                    self._check_example_set(_example_set(examples), f"line {number}")
                self._entries[entry["key"]] = entry
            good = "".join(line + "\n" for line in lines[:len(records)])
            if good != text:  # drop a cut-short last line / restore a missing final newline before appending
                handle.seek(0)
                handle.write(good.encode("utf-8"))
                handle.truncate()
                handle.flush()
                os.fsync(handle.fileno())

    def _check_example_set(self, found: tuple[tuple[str, ...], int], where: str) -> None:
        """Every entry's per-example statistics cover one example set (one journal = one evaluation set)."""
        if self._example_set is None:
            self._example_set = found
        elif found != self._example_set:
            raise ConfigError(f"journal {self.path} {where}: per-example statistics {found[0]} of {found[1]} "
                              f"examples, but the journal holds {self._example_set[0]} of "
                              f"{self._example_set[1]}: one journal holds one evaluation set; pass another journal "
                              f"path or delete it to start over.")

    def _check_header(self, header: Any) -> None:
        if not isinstance(header, dict) or header.get("journal") != JOURNAL_TAG:
            raise ConfigError(f"{self.path} is not a QSLM search journal (its first line is not a "
                              f"'{JOURNAL_TAG}' header), so it is left untouched; pass another journal path.")
        if header.get("version") != JOURNAL_VERSION:
            raise ConfigError(
                f"journal {self.path} has format version {header.get('version')}, expected {JOURNAL_VERSION} "
                f"(version 2 stores the per-example statistics the confidence intervals are computed from, "
                f"which a version-1 journal lacks). It is left untouched: pass another journal path (or none, "
                f"for the default) and its candidates are evaluated again, or delete the file.")
        if header.get("fingerprint") != self.fingerprint:
            found = header.get("meta", {})
            differs = sorted(k for k in set(found) | set(self.meta) if found.get(k) != self.meta.get(k))
            raise ConfigError(
                f"journal {self.path} was written for a different setup: expected fingerprint "
                f"{self.fingerprint[:12]} (meta {self.meta}), found {str(header.get('fingerprint'))[:12]} "
                f"(meta {found}); differing fields: {differs}. Its metrics do not apply here: pass another "
                f"journal path, or delete the file to start over."
            )
