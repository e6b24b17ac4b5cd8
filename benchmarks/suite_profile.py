"""Where the test suite's time goes: compilation, tracing, lowering and running, per test file.

A pytest plugin and its report. The plugin listens to JAX's compile-time monitoring events
(`jaxpr_trace_duration`, `jaxpr_to_mlir_module_duration`, `backend_compile_duration`, each with
the jitted function's name) and writes one JSON line per test: its wall time (setup, call and
teardown) and every compile event inside it. Programs compiled in subprocesses (multi-device,
CLI, notebooks) are not seen: their whole time counts as running.

    PYTHONPATH=benchmarks SUITE_PROFILE=/tmp/suite.jsonl \\
        python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -p suite_profile
    python benchmarks/suite_profile.py /tmp/suite.jsonl [--programs 20]

The report lists files by worker-seconds with their compile / trace / lower / running shares,
then the jitted functions that cost the most compilation (count and seconds). Used on
2026-12-05 to find that decode loops are ~1/3 of the suite's compile-and-trace time, spread over
every file, and to pick the one-LLVM-module flag in tests/conftest.py.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time
from collections.abc import Generator
from typing import Any

import pytest

EVENTS = {  # JAX's event name suffix -> report column
    "jaxpr_trace_duration": "trace",
    "jaxpr_to_mlir_module_duration": "lower",
    "backend_compile_duration": "compile",
}
_events: list[tuple[str, str, float]] = []  # (column, function name, seconds) of the running test
_listening = False


def _listen() -> None:
    global _listening
    if _listening:
        return
    import jax.monitoring

    def record(event: str, seconds: float, **kw: Any) -> None:
        column = EVENTS.get(event.rsplit("/", 1)[-1])
        if column is not None:
            _events.append((column, str(kw.get("fun_name")), seconds))

    jax.monitoring.register_event_duration_secs_listener(record)
    _listening = True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator:
    _listen()
    _events.clear()
    start = time.perf_counter()
    yield
    record = {"test": item.nodeid, "wall": time.perf_counter() - start, "events": list(_events)}
    with open(os.environ.get("SUITE_PROFILE", "suite_profile.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def report(path: str, programs: int = 20) -> str:
    """The per-file table and the costliest jitted functions of a plugin's JSON lines."""
    files: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    compiles: collections.Counter = collections.Counter()
    seconds: collections.Counter = collections.Counter()
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            row = files[rec["test"].split("::")[0].rsplit("/", 1)[-1]]
            row["wall"] += rec["wall"]
            for column, name, sec in rec["events"]:
                row[column] += sec
                if column == "compile":
                    row["n"] += 1
                    compiles[name] += 1
                    seconds[name] += sec
    head = f"{'file':<28} {'wall':>7} {'compile':>8} {'n':>5} {'trace':>6} {'lower':>6} {'run':>7}"
    lines = [head]
    total: collections.Counter = collections.Counter()
    for name, row in sorted(files.items(), key=lambda kv: -kv[1]["wall"]):
        total.update(row)
        run = row["wall"] - row["compile"] - row["trace"] - row["lower"]
        lines.append(
            f"{name:<28} {row['wall']:7.1f} {row['compile']:8.1f} {row['n']:5d} "
            f"{row['trace']:6.1f} {row['lower']:6.1f} {run:7.1f}"
        )
    run = total["wall"] - total["compile"] - total["trace"] - total["lower"]
    lines.append(
        f"{'TOTAL':<28} {total['wall']:7.1f} {total['compile']:8.1f} {total['n']:5d} "
        f"{total['trace']:6.1f} {total['lower']:6.1f} {run:7.1f}"
    )
    lines.append("\ncompile seconds by jitted function:")
    for name, sec in seconds.most_common(programs):
        lines.append(f"  {sec:7.1f} s {compiles[name]:5d}  {name}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("path", help="the JSON lines the plugin wrote (SUITE_PROFILE)")
    ap.add_argument("--programs", type=int, default=20, help="jitted functions to list")
    args = ap.parse_args()
    print(report(args.path, args.programs))


if __name__ == "__main__":
    main()
