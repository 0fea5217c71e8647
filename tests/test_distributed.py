"""Multi-process evaluation on JAX's distributed runtime: two local CPU processes (gloo collectives) against one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qslm_jax.errors import ConfigError
from qslm_jax.qslm.distributed import check_arguments, cluster_detected

REPO = Path(__file__).resolve().parent.parent
SEARCH = ["-m", "experiments.tiered", "--model", "spikegpt-micro", "--init", "random", "--levels", "32,4",
          "--no-progress", "--task", "sst2", "--eval-limit", "48", "--const-a", "100", "--const-m-frac", "0.9",
          "--heartbeat-timeout", "10"]
RUN_DEPENDENT = {"timings", "invocations", "power", "versions"}  # wall-clock seconds, device names


def _env(devices: int = 1) -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "PYTHONPATH": str(REPO), "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group(port: int, process_id: int) -> list[str]:
    return ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(process_id)]


def _comparable(report: dict) -> dict:
    """The report without what depends on the run rather than the search: times, paths, device names."""
    out = {k: v for k, v in report.items() if k not in RUN_DEPENDENT}
    out["cost"] = {k: v for k, v in report["cost"].items() if k not in ("seconds", "seconds_per_slot",
                                                                        "peak_rss_bytes")}
    out["search"] = {k: v for k, v in report["search"].items() if k != "seconds"}
    out["export"] = {k: v for k, v in report["export"].items() if k != "path"}
    out["journal"] = report["journal"]["entries"]
    return out


def _two_processes(out: Path) -> list[str]:
    """Run the search as two processes into ``out``; their stdouts."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, *SEARCH, "--out", str(out), *_group(port, i)], cwd=REPO,
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in (0, 1)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return [stdout for stdout, _ in outputs]


@pytest.mark.slow
def test_two_processes_write_the_report_of_one_process_and_resume_from_its_journal(tmp_path, data_dir):
    two, one = tmp_path / "two" / "case", tmp_path / "one" / "case"
    # one process over two devices: the same global mesh of two devices, so the same chunks and calls
    single = subprocess.Popen([sys.executable, *SEARCH, "--out", str(one)], cwd=REPO, env=_env(devices=2),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outputs = _two_processes(two)
    _, err = single.communicate(timeout=600)
    assert single.returncode == 0, err[-3000:]
    assert "report: written by process 0" in outputs[1]
    a, b = (json.loads((d / "report.json").read_text()) for d in (one, two))
    assert b["versions"]["devices"] != a["versions"]["devices"] and len(b["versions"]["devices"]) == 2
    assert _comparable(b) == _comparable(a)
    assert b["evaluations"] > 0 and b["selection"]["metric"] == a["selection"]["metric"]
    # only process 0 wrote: one header + one line per evaluation in each journal, nothing beside the case folder
    for journal in (two.parent / "journals").glob("*.jsonl"):
        lines = journal.read_text().splitlines()
        assert len(lines) == 1 + len({json.loads(line)["key"] for line in lines[1:]}), journal
    assert sorted(p.name for p in two.parent.iterdir()) == ["case", "journals"]
    # a rerun of both processes takes every evaluation from process 0's journal
    _two_processes(two)
    again = json.loads((two / "report.json").read_text())
    assert again["evaluations"] == 0 and again["candidates"] == b["candidates"]
    assert [run["evaluations"] for run in again["invocations"]] == [b["evaluations"], 0]


@pytest.mark.slow
def test_a_dead_process_stops_the_other_fast_with_a_clear_message(tmp_path, data_dir):
    port = _free_port()
    tic = time.perf_counter()
    survivor = subprocess.Popen([sys.executable, *SEARCH, "--out", str(tmp_path / "case"), *_group(port, 0)],
                                cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    crash = ("import os, sys; from qslm_jax.qslm.distributed import initialize; "
             f"initialize('127.0.0.1:{port}', 2, 1, heartbeat_timeout_s=10); os._exit(9)")
    assert subprocess.run([sys.executable, "-c", crash], cwd=REPO, env=_env(), timeout=300).returncode == 9
    _, err = survivor.communicate(timeout=300)
    assert survivor.returncode != 0
    assert "another process died" in err or "another task died" in err, err[-3000:]
    assert time.perf_counter() - tic < 150  # the 10 s heartbeat, not JAX's 100 s default or a hang


HELPERS = """
import sys
from qslm_jax.qslm.distributed import (initialize, min_bytes_over_processes, same_on_every_process,
                                       share_from_main)
group = initialize("127.0.0.1:{port}", 2, int(sys.argv[1]), heartbeat_timeout_s=10)
assert (group.num_processes, group.global_devices) == (2, 2)
mine = {{"process": group.process_id, "metric": 0.1 + group.process_id}}
print("SHARED", share_from_main(mine))
print("SAME", same_on_every_process("setup"), same_on_every_process(f"setup {{group.process_id}}"))
print("MIN", min_bytes_over_processes(2 ** 40 + 2 ** 20 * (1 + group.process_id)))
"""


@pytest.mark.slow
def test_process_0_shares_its_values_and_every_process_compares_setups():
    code = HELPERS.format(port=_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        assert "SHARED {'process': 0, 'metric': 0.1}" in out  # process 0's value, in both
        assert "SAME True False" in out
        assert f"MIN {2 ** 40 + 2 ** 20}" in out  # the smaller, in bytes beyond int32


def test_the_process_group_flags_are_checked_up_front():
    check_arguments(None, None, None)
    check_arguments("10.0.0.1:1234", 4, 3)
    for args, message in (((None, 2, 0), "go together"), (("host", 2, 0), "HOST:PORT"),
                          (("host:1", 2, 2), r"\[0, 2\)")):
        with pytest.raises(ConfigError, match=message):
            check_arguments(*args)


def test_cluster_detection_reads_the_launchers_environment():
    assert not cluster_detected({})
    assert not cluster_detected({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"})  # one task: nothing to join
    assert cluster_detected({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"})
    assert cluster_detected({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "2"})
    assert cluster_detected({"TPU_WORKER_HOSTNAMES": "a,b"})
