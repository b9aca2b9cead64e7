"""`telerad autoscale-sim`: the day it replays, and the line scripts read."""

from __future__ import annotations

import re

from click.testing import CliRunner

from telerad.api.types import Priority
from telerad.cli import cli
from telerad.operator.autoscale import simulate

LAST_LINE = re.compile(
    r"^saved_gpu_hours_pct=(-?[0-9.]+) p95_stat_wait_s=([0-9.]+) fixed_p95_stat_wait_s=([0-9.]+)$"
)


def test_the_last_line_is_for_scripts_and_agrees_with_the_table() -> None:
    out = CliRunner().invoke(cli, ["autoscale-sim", "--seed", "2"])
    assert out.exit_code == 0, out.output
    *table, last = out.output.strip().splitlines()
    found = LAST_LINE.match(last)
    assert found is not None, last
    telerad, fixed = (float(row.split("|")[2]) for row in table[2:4])
    assert float(found.group(1)) == round(100 * (1 - telerad / fixed), 1)


def test_every_fleet_serves_the_same_day_and_the_scalers_differ_as_designed() -> None:
    day = simulate.arrivals(seed=3)
    assert {m: len(jobs) for m, jobs in day.items()}.keys() == simulate.PEAK_PER_HOUR.keys()
    telerad, fixed, keda = simulate.run(seed=3)
    for result in (telerad, fixed, keda):
        served = {p: len(w) for p, w in result.waits.items()}
        assert served == {p: len(telerad.waits[p]) for p in Priority}
    assert sum(len(j) for j in day.values()) == sum(len(w) for w in telerad.waits.values())
    # Keeping a worker warm for stat studies is what the KEDA-like scaler lacks.
    assert telerad.p95(Priority.STAT) < keda.p95(Priority.STAT)
    assert keda.gpu_hours < telerad.gpu_hours < fixed.gpu_hours
    assert fixed.gpu_hours == 24 * sum(simulate.peak_fleet(m) for m in day)
