"""Several processes (hosts) evaluating one search together, on JAX's distributed runtime.

JAX's multi-controller model: the same command runs once per process (one process per host, each driving its
local devices); :func:`initialize` joins them through ``jax.distributed.initialize`` (coordinator
``HOST:PORT``, process count, this process's id; or nothing, when JAX detects the cluster from SLURM, Open MPI
or a multi-host TPU). The evaluator's mesh then spans every process's devices (``jax.devices()``), so each
compiled call shards its candidates over all of them, and its replicated output gives every process every
metric. Every process therefore runs the same search and makes the same calls in the same order; what could
make them differ is shared from process 0: the journal's entries (:func:`share_from_main`), after a check that
every process has the same setup (:func:`same_on_every_process`). Only process 0
writes (journal, report, export); the others write into a scratch directory (:func:`output_dir`) they delete.

A process that dies fails the others fast: a collective with it fails (:func:`collectives`, a
:class:`~qslm_jax.errors.DistributedError`), and between collectives the coordination service stops every
process once its heartbeat is ``heartbeat_timeout_s`` late. Rerunning every process resumes from process 0's
journal. On CPUs the cross-process collectives are gloo's (``jax_cpu_collectives_implementation``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qslm_jax.errors import ConfigError, DistributedError

DEFAULT_HEARTBEAT_S = 20  # a dead process is noticed within this many seconds (JAX's own default is 100)
DEFAULT_INIT_TIMEOUT_S = 120  # how long a process waits for the others to join


@dataclass(frozen=True)
class ProcessGroup:
    """Where this process stands: its id, how many processes there are, how many devices in all."""

    process_id: int
    num_processes: int
    global_devices: int

    @property
    def is_main(self) -> bool:
        """Process 0 is the one that writes."""
        return self.process_id == 0


def cluster_detected(environ: dict[str, str] | None = None) -> bool:
    """Whether the environment is a multi-process job JAX's cluster detection understands: SLURM with several
    tasks, Open MPI (``mpirun``) with several ranks, or a TPU slice of several hosts."""
    env = os.environ if environ is None else environ
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1"))) > 1:
        return True
    if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return True
    return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def check_arguments(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Refuse an incomplete or inconsistent process group before anything starts (:class:`ConfigError`)."""
    given = [x is not None for x in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise ConfigError("--coordinator, --num-processes and --process-id go together (found "
                          f"coordinator={coordinator}, num_processes={num_processes}, process_id={process_id}); "
                          "give all three, or none inside a SLURM / Open MPI / TPU job")
    if not any(given):
        return
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--coordinator must be HOST:PORT (process 0's address), found {coordinator!r}")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ConfigError(f"--process-id must be in [0, {num_processes}) for --num-processes {num_processes}, "
                          f"found {process_id}")


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_S,
               init_timeout_s: int = DEFAULT_INIT_TIMEOUT_S) -> ProcessGroup:
    """Join the process group (``jax.distributed.initialize``) when one is described, by the three arguments
    or by the cluster environment (:func:`cluster_detected`); otherwise stay a single process. Must run before
    any JAX computation; selects gloo for the CPU collectives."""
    import jax

    check_arguments(coordinator, num_processes, process_id)
    if coordinator is not None and num_processes == 1:
        coordinator = None  # a group of one needs no runtime
    if coordinator is not None or cluster_detected():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, heartbeat_timeout_seconds=heartbeat_timeout_s,
                                   initialization_timeout=init_timeout_s)
    return ProcessGroup(jax.process_index(), jax.process_count(), jax.device_count())


def is_main_process() -> bool:
    """True in process 0 (and in a single-process run): the process that writes files."""
    import jax

    return jax.process_index() == 0


def share_from_main(value: Any) -> Any:
    """Process 0's ``value`` (JSON-serializable) in every process (``broadcast_one_to_all`` of its JSON bytes);
    ``value`` itself in a single-process run. Every process must call it at the same point."""
    import jax
    import numpy as np

    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    with collectives():
        data = np.frombuffer(json.dumps(value).encode(), np.uint8) if is_main_process() else np.zeros(0, np.uint8)
        size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
        received = multihost_utils.broadcast_one_to_all(data if is_main_process() else np.zeros(size, np.uint8))
    return json.loads(np.asarray(received, np.uint8).tobytes())


def same_on_every_process(text: str) -> bool:
    """Whether every process passed the same ``text`` (compared by the first 8 bytes of its SHA-256, gathered
    with ``process_allgather``); True in a single-process run."""
    import jax

    if jax.process_count() == 1:
        return True
    import numpy as np
    from jax.experimental import multihost_utils

    digest = np.frombuffer(hashlib.sha256(text.encode()).digest()[:8], np.int32)
    with collectives():
        gathered = np.asarray(multihost_utils.process_allgather(digest))
    return bool((gathered == gathered[0]).all())


def min_bytes_over_processes(value: int) -> int:
    """The smallest of every process's ``value`` bytes (``process_allgather``, in KiB: int32 without x64,
    rounded down); ``value`` in a single-process run."""
    import jax

    if jax.process_count() == 1:
        return value
    import numpy as np
    from jax.experimental import multihost_utils

    with collectives():
        return 1024 * int(np.min(multihost_utils.process_allgather(np.int32(value // 1024))))


@contextlib.contextmanager
def collectives() -> Iterator[None]:
    """Turn a failed cross-process collective (a process died, was stopped or lost its link) into a
    :class:`DistributedError` saying so; a no-op in a single-process run."""
    import jax

    try:
        yield
    except (RuntimeError, ValueError) as err:
        if jax.process_count() == 1:
            raise
        raise DistributedError(
            f"process {jax.process_index()} of {jax.process_count()}: a collective across the processes failed "
            f"({str(err).splitlines()[0][:300]}); most likely another process died or was stopped (see its log). "
            "Rerun every process with the same command: process 0's journal keeps the evaluations so far."
        ) from err


@contextlib.contextmanager
def output_dir(out: Path) -> Iterator[Path]:
    """``out`` in process 0; in the others a scratch directory of the same name, deleted afterwards (only
    process 0 writes the report and export)."""
    if is_main_process():
        yield Path(out)
        return
    scratch = Path(tempfile.mkdtemp(prefix="qslm-follower-"))
    try:
        yield scratch / Path(out).name
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def exit_now(code: int) -> None:
    """Leave at once with ``code`` (streams flushed), skipping JAX's shutdown barrier, which would wait for a
    process that is gone."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
