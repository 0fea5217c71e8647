"""NVML power sampler: integration maths with injected samplers, the no-GPU path, visible-device parsing."""

from __future__ import annotations

import sys
import time

import pytest

from qslm_jax.errors import ConfigError
from qslm_jax.qslm import power
from qslm_jax.qslm.power import PowerMeter, PowerUnavailable, integrate_power, nvml_power_reader


def test_trapezoid_integration_by_hand():
    # 10 W -> 20 W over the first second (15 J), then 20 W for two seconds (40 J): 55 J over 3 s
    energy, mean = integrate_power([0.0, 1.0, 3.0], [10.0, 20.0, 20.0])
    assert energy == pytest.approx(55.0) and mean == pytest.approx(55.0 / 3)
    assert integrate_power([5.0], [42.0]) == (0.0, 42.0)
    with pytest.raises(ConfigError):
        integrate_power([0.0, 1.0], [1.0])


def test_meter_with_constant_fake_sampler():
    with PowerMeter(0.01, read_watts=lambda: 100.0, devices=("fake",)) as meter:
        time.sleep(0.1)
    r = meter.reading
    assert r.measured and r.samples >= 3 and r.devices == ("fake",)
    assert r.mean_w == pytest.approx(100.0)
    assert r.energy_j == pytest.approx(100.0 * r.seconds)
    assert 0.09 < r.seconds < 5.0
    assert "100.0 W mean" in r.summary()


def test_meter_with_fake_clock_and_ramp():
    # deterministic clock: each call advances 1 s; the sampler reports 10 W per elapsed clock tick
    ticks = iter(range(10_000))
    now = {"t": 0.0}

    def clock():
        now["t"] = float(next(ticks))
        return now["t"]

    with PowerMeter(0.005, read_watts=lambda: 10.0 * now["t"], clock=clock) as meter:
        time.sleep(0.05)
    r = meter.reading
    # sample i reads 10 * (the previous clock value) and is stamped with the next one: P(t) = 10 (t - 1)
    # on the stamps t_k, so the trapezoid rule is exact: E = 5 ((t_n - 1)^2 - (t_0 - 1)^2)
    assert r.measured and r.samples >= 2
    times = [t for t, _ in meter.trace]
    assert r.energy_j == pytest.approx(5 * ((times[-1] - 1) ** 2 - (times[0] - 1) ** 2))


def test_failing_sampler_is_not_measured():
    def broken():
        raise OSError("sensor gone")

    with PowerMeter(0.01, read_watts=broken) as meter:
        time.sleep(0.02)
    r = meter.reading
    assert not r.measured and r.mean_w is None and r.energy_j is None
    assert "sensor gone" in r.reason and r.summary().startswith("not measured")


def test_without_pynvml_nothing_is_made_up(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    with PowerMeter() as meter:
        pass
    assert not meter.reading.measured and "nvidia-ml-py" in meter.reading.reason
    assert meter.reading.mean_w is None and meter.reading.devices == ()


def test_this_machine_reports_consistently():
    try:
        nvml_power_reader()[2]()
        has_gpu = True
    except PowerUnavailable:
        has_gpu = False
    with PowerMeter(0.01) as meter:
        time.sleep(0.05)
    r = meter.reading
    assert r.measured == has_gpu
    if has_gpu:
        assert r.mean_w > 0 and r.energy_j > 0
    else:
        assert r.mean_w is None and r.energy_j is None and r.reason


class FakeNVML:
    """Just enough of pynvml for the visible-device rules."""

    def nvmlDeviceGetCount(self):
        return 3

    def nvmlDeviceGetHandleByIndex(self, i):
        return f"idx{i}"

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return f"uuid:{uuid}"


def test_visible_devices(monkeypatch):
    fake = FakeNVML()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert power._visible_handles(fake) == ["idx0", "idx1", "idx2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,GPU-abc")
    assert power._visible_handles(fake) == ["idx2", "uuid:GPU-abc"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(PowerUnavailable, match="hides every GPU"):
        power._visible_handles(fake)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-1234")
    with pytest.raises(PowerUnavailable, match="MIG"):
        power._visible_handles(fake)
