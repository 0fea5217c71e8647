"""The default memory budget of the evaluator: a fraction of what the device (on a CPU, the host) can hold."""

from __future__ import annotations

import os

import jax

from qslm_jax.qslm.device_memory import (
    DEFAULT_FRACTION,
    available_ram_bytes,
    default_budget_bytes,
    device_memory_bytes,
    memory_budget_bytes,
)


def test_a_cpu_counts_the_host_ram_it_can_get_and_the_budget_is_a_fraction_of_it():
    (device,) = jax.local_devices()[:1]
    total = device_memory_bytes(device)
    available = available_ram_bytes()
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < total <= physical // len(jax.local_devices())
    if available is not None:  # Linux: never more than what is free now allows
        assert total <= available
    budget = default_budget_bytes(jax.local_devices())
    assert budget == int(DEFAULT_FRACTION * total)
    assert memory_budget_bytes(None, jax.local_devices()) == budget
    assert memory_budget_bytes(2.5, jax.local_devices()) == 2_500_000_000
