"""How much memory a device offers the evaluator: the default of ``--memory-budget-gb``.

An accelerator reports its allocator's limit (``device.memory_stats()["bytes_limit"]``); a CPU device shares the
host's physical RAM with the other CPU devices of its process and with everything else on the host, so it counts
the smaller of the physical RAM and what is available now (``MemAvailable`` of ``/proc/meminfo``). The default
budget is :data:`DEFAULT_FRACTION` of that, so the chunk the evaluator sizes
from XLA's memory analysis leaves room for the host-side copies of the model, the compiler and other processes
(nothing is OOM-killed).
"""

from __future__ import annotations

import os

import jax

from qslm_jax.qslm.distributed import min_bytes_over_processes

DEFAULT_FRACTION = 0.5


def device_memory_bytes(device: jax.Device) -> int:
    """Bytes one ``device`` can hold: its allocator limit, or on a CPU the host's RAM (physical, or what is
    available now if less) divided among the process's CPU devices."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    available = available_ram_bytes()
    if available is not None:
        ram = min(ram, available)
    return ram // max(1, sum(d.platform == "cpu" for d in jax.local_devices()))


def available_ram_bytes() -> int | None:
    """The host's ``MemAvailable`` (Linux ``/proc/meminfo``: free plus reclaimable), None where unknown."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def default_budget_bytes(devices, fraction: float = DEFAULT_FRACTION) -> int:
    """``fraction`` of the smallest of ``devices``' memory (:func:`device_memory_bytes`), per device."""
    local = [d for d in devices if d.process_index == jax.process_index()] or list(devices)
    return int(fraction * min(device_memory_bytes(d) for d in local))


def memory_budget_bytes(gigabytes: float | None, devices) -> int:
    """The evaluator's per-device budget: ``gigabytes`` (10^9 bytes) when given, else :func:`default_budget_bytes`;
    in a multi-process run the smallest over the processes, so all of them size the same chunks."""
    budget = int(gigabytes * 1e9) if gigabytes is not None else default_budget_bytes(devices)
    return min_bytes_over_processes(budget)
