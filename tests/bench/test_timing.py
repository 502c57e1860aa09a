"""emanet.bench.timing: the machine's load as /proc tells it."""

from __future__ import annotations

from emanet.bench.timing import machine_load


def test_machine_load_reads_proc():
    load = machine_load()
    assert set(load) == {"loadavg_1m", "loadavg_5m", "loadavg_15m"} and all(v >= 0 for v in load.values())
