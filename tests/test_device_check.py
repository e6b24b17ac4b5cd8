"""benchmarks/device_check.py --tiny: the accelerator check's whole code path, on CPU."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import device_check  # noqa: E402


def test_device_check_tiny():
    # Its own process, as the script runs on a GPU machine: a crash inside XLA's compiler (seen
    # once, a segfault compiling this check's greedy-identity program late in a long-lived
    # xdist worker, likely past the memory-mapping limit conftest now guards; alone it passes)
    # then fails this test instead of killing the worker and ending the run.
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "device_check.py"), "--tiny"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout
    assert proc.returncode == 0, (out + proc.stderr)[-4000:]  # 0: every section ran, no error
    for title in (
        "## 1. tree attention: Pallas vs XLA",
        "## 2. verify forward",
        "## 3. plain step, step anatomy",
        "## 4. greedy identity in float32",
    ):
        assert title in out
    assert "FAILED" not in out and "Traceback" not in out
    # the attention table has a row with finite errors at float32 precision
    row = next(line for line in out.splitlines() if line.startswith("| 64 | 4 |"))
    pallas_err, xla_err = (float(x) for x in row.split("|")[9:11])
    assert pallas_err < 1e-4 and xla_err < 1e-4
    assert "| 2 |" in out  # verify table: T = 1 and 2
    assert "layer_skip:1@2: 0 KV-cache-sized copies in the compiled decode loop body" in out
    assert "GB/s achieved" in out and "| remainder |" in out
    assert "rows differing from plain greedy 0/2" in out  # float32: identical


def test_device_check_without_gpu_exits_0(capsys, monkeypatch):
    monkeypatch.setattr(device_check.jax, "default_backend", lambda: "cpu")
    assert device_check.main([]) == 0
    assert "no GPU here" in capsys.readouterr().out
