"""Measured GPU power (qslm.md section 4; the paper used nvidia-smi): an NVML sampler around a region of code.

``with PowerMeter() as meter: ...`` samples the summed board power of the visible NVIDIA GPUs every
``interval_s`` (default 50 ms) in a background thread, plus one sample at entry and one at exit; afterwards
``meter.reading`` holds the energy ``E = integral of P dt`` (trapezoid rule over the samples, joules) and the
mean power ``E / duration`` (watts). Visible GPUs: those named by ``CUDA_VISIBLE_DEVICES`` (indices in NVML's
PCI-bus order, or ``GPU-`` UUIDs), else all. Without ``pynvml`` (package nvidia-ml-py), a driver or a GPU, or
when the GPU does not report power, the reading says ``measured=False`` and why: never a made-up number.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from qslm_jax.errors import ConfigError, QSLMError

ReadWatts = Callable[[], float]


@dataclass(frozen=True)
class PowerReading:
    """What one measured region drew: mean power (W) and energy (J), or why it was not measured."""

    measured: bool
    mean_w: float | None
    energy_j: float | None
    seconds: float
    samples: int
    devices: tuple[str, ...] = ()
    reason: str = ""  # set when not measured

    def summary(self) -> str:
        """One line for reports."""
        if not self.measured:
            return f"not measured ({self.reason})"
        return (f"{self.mean_w:.1f} W mean, {self.energy_j:.2f} J over {self.seconds:.3f} s "
                f"({self.samples} samples, {', '.join(self.devices)})")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON reports."""
        return {"measured": self.measured, "mean_w": self.mean_w, "energy_j": self.energy_j,
                "seconds": self.seconds, "samples": self.samples, "devices": list(self.devices),
                "reason": self.reason}


def integrate_power(times: Sequence[float], watts: Sequence[float]) -> tuple[float, float]:
    """``(energy J, mean W)`` of power samples: trapezoid rule ``sum (t_{i+1} - t_i)(P_i + P_{i+1}) / 2`` and
    ``E / (t_last - t_first)``; a single sample (zero duration) gives ``(0, P_0)``."""
    if len(times) != len(watts) or not times:
        raise ConfigError(f"need as many times as power samples (at least one), found {len(times)} and "
                          f"{len(watts)}")
    energy = sum((t1 - t0) * (p0 + p1) / 2 for t0, t1, p0, p1 in zip(times, times[1:], watts, watts[1:],
                                                                       strict=False))
    duration = times[-1] - times[0]
    return energy, (energy / duration if duration > 0 else float(watts[0]))


class PowerUnavailable(QSLMError):
    """Why NVML power cannot be read here; :class:`PowerMeter` turns it into ``measured=False``."""


def _visible_handles(pynvml: Any) -> list[Any]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if not entries:
        raise PowerUnavailable("CUDA_VISIBLE_DEVICES hides every GPU")
    if any(e.startswith("MIG-") for e in entries):
        raise PowerUnavailable("MIG instances do not report their own power")
    return [pynvml.nvmlDeviceGetHandleByUUID(e) if e.startswith("GPU-") else
            pynvml.nvmlDeviceGetHandleByIndex(int(e)) for e in entries]


def nvml_power_reader() -> tuple[ReadWatts, tuple[str, ...], Callable[[], None]]:
    """``(read_watts, device names, shutdown)`` for the visible GPUs; :class:`PowerUnavailable` if
    impossible."""
    try:
        import pynvml
    except ImportError as err:
        raise PowerUnavailable("pynvml (package nvidia-ml-py) is not installed") from err
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        raise PowerUnavailable(f"no NVIDIA driver/GPU: NVML init failed ({err})") from err
    try:
        handles = _visible_handles(pynvml)
        if not handles:
            raise PowerUnavailable("NVML sees no GPU")
        names = tuple(f"{i}:{pynvml.nvmlDeviceGetName(h)}" for i, h in enumerate(handles))

        def read_watts() -> float:
            return sum(pynvml.nvmlDeviceGetPowerUsage(h) for h in handles) / 1000.0  # NVML reports mW

        read_watts()
    except (pynvml.NVMLError, ValueError, PowerUnavailable) as err:
        pynvml.nvmlShutdown()
        reason = str(err) if isinstance(err, PowerUnavailable) else f"GPU power not readable ({err})"
        raise PowerUnavailable(reason) from err
    return read_watts, names, pynvml.nvmlShutdown


class PowerMeter:
    """Context manager sampling GPU power in a background thread; ``reading`` is set on exit.

    ``read_watts`` replaces NVML (tests, other power sources; ``devices`` then names them); ``clock`` is the
    time source (seconds).
    """

    def __init__(self, interval_s: float = 0.05, *, read_watts: ReadWatts | None = None,
                 devices: Sequence[str] = ("injected",), clock: Callable[[], float] = time.perf_counter):
        self.interval_s, self.clock = interval_s, clock
        self._read, self._shutdown = read_watts, None
        self._devices = tuple(devices) if read_watts is not None else ()
        self._times: list[float] = []
        self._watts: list[float] = []
        self._error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = 0.0
        self.reading: PowerReading | None = None

    @property
    def trace(self) -> list[tuple[float, float]]:
        """The raw samples ``(time s, power W)`` taken so far."""
        return list(zip(self._times, self._watts, strict=False))  # safe while the thread appends

    def _sample(self) -> None:
        try:
            watts = float(self._read())
        except Exception as err:  # any sampler failure means "not measured", with the reason
            self._error = self._error or f"power sampling failed ({type(err).__name__}: {err})"
            return
        self._times.append(self.clock())
        self._watts.append(watts)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> PowerMeter:
        self._start = self.clock()
        if self._read is None:
            try:
                self._read, self._devices, self._shutdown = nvml_power_reader()
            except PowerUnavailable as err:
                self._error = str(err)
                return self
        self._sample()
        self._thread = threading.Thread(target=self._run, name="power-meter", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._sample()
        seconds = self.clock() - self._start
        if self._shutdown is not None:
            self._shutdown()
        if self._error or not self._times:
            self.reading = PowerReading(False, None, None, seconds, len(self._times), self._devices,
                                        self._error or "no power sample was taken")
            return
        energy, mean = integrate_power(self._times, self._watts)
        self.reading = PowerReading(True, mean, energy, self._times[-1] - self._times[0], len(self._times),
                                    self._devices)
