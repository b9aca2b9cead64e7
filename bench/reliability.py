"""Run every test marked `reliability` (tests/conftest.py) RUNS times and write the table of
RELIABILITY.md: what was tried, how often, the outcome, what was lost.

    .venv/bin/python bench/reliability.py [--runs N] [--out RELIABILITY.md]

Each of those tests asserts that nothing acknowledged was lost (instances, jobs, alerts,
exports) or that nothing refused got in, so "lost" is "nothing" exactly when every run
passed. The rest of RELIABILITY.md (what is not covered yet) is kept as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- table: bench/reliability.py -->", "<!-- end of table -->"
ORDER = {"fault": 0, "load": 1, "attack": 2, "fuzz": 3}


def run(runs: int, report: Path) -> None:
    env = {**os.environ, "TELERAD_RELIABILITY_REPORT": str(report)}
    for n in range(runs):
        print(f"run {n + 1} of {runs}", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-m", "reliability", "-p", "no:cacheprovider"],
            cwd=ROOT,
            env=env,
            check=False,
        )


def table(lines: list[dict[str, str]]) -> list[str]:
    rows: dict[tuple[str, str, str], list[dict[str, str]]] = defaultdict(list)
    for line in lines:
        rows[(line["kind"], line["tried"], line["test"].split("[")[0])].append(line)
    out = [
        "| kind | fault or attack | runs | outcome | lost | test |",
        "|---|---|---|---|---|---|",
    ]
    for (kind, tried, test), results in sorted(
        rows.items(), key=lambda r: (ORDER[r[0][0]], r[0][1])
    ):
        passed = sum(r["outcome"] == "passed" for r in results)
        outcome = "survived" if passed == len(results) else f"FAILED {len(results) - passed}"
        lost = "nothing" if passed == len(results) else "see the failing run"
        cases = sum(int(r.get("cases", 1)) for r in results)
        out.append(f"| {kind} | {tried} | {cases} | {outcome} | {lost} | `{test}` |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "RELIABILITY.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        report = Path(work) / "report.jsonl"
        started = time.monotonic()
        run(args.runs, report)
        lines = [json.loads(x) for x in report.read_text().splitlines()] if report.exists() else []
    if not lines:
        sys.exit("no reliability test reported: is the suite installed (make test)?")
    when = time.strftime("%Y-%m-%d", time.gmtime())
    block = [
        BEGIN,
        f"`.venv/bin/python bench/reliability.py --runs {args.runs}` on {platform.node()}, "
        f"{os.cpu_count()} CPUs, {when}, {time.monotonic() - started:.0f} s.",
        "",
        *table(lines),
        END,
    ]
    text = args.out.read_text() if args.out.exists() else f"# Reliability\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    args.out.write_text(head + "\n".join(block) + tail)
    print("\n".join(block[3:-1]))
    failed = [x for x in lines if x["outcome"] != "passed"]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
