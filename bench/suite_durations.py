"""The test suite's time per module, from pytest's own `--durations`: a Markdown table of tests and
seconds per module (setup, call and teardown summed), slowest first, with the whole run's total.

    python -m bench.suite_durations -- -m "not slow"     # runs pytest with these arguments, then the table
    python -m bench.suite_durations --log pytest.log     # the table of a run already made with
                                                         # --durations=0 --durations-min=0

A module-scoped or session fixture's set-up counts in the module of the first test that asks for it.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

# "12.34s call     tests/test_x.py::test_y[case]" (pytest's --durations lines)
DURATION = re.compile(r"^([\d.]+)s (setup|call|teardown)\s+(\S+?\.py)::(\S.*)$")
# "446 passed, 1 skipped in 577.12s (0:09:37)", between "=" signs without -q (the summary line)
SUMMARY = re.compile(r"^=*\s*(\d+ (?:passed|failed|skipped|deselected|error).*) in ([\d.]+)s\b")


def per_module(log: str) -> dict[str, tuple[int, float]]:
    """{module path: (tests, seconds)} from the --durations lines of a pytest log."""
    tests: dict[str, set[str]] = defaultdict(set)
    seconds: dict[str, float] = defaultdict(float)
    for line in log.splitlines():
        if m := DURATION.match(line.strip()):
            duration, _, module, test = m.groups()
            tests[module].add(test)
            seconds[module] += float(duration)
    return {module: (len(tests[module]), seconds[module]) for module in tests}


def table(log: str) -> str:
    """The Markdown table of a pytest log, slowest module first, and the run's summary line."""
    modules = sorted(per_module(log).items(), key=lambda item: -item[1][1])
    rows = ["| module | tests | seconds |", "| --- | ---: | ---: |"]
    rows += [f"| `{module}` | {n} | {s:.1f} |" for module, (n, s) in modules]
    n, s = sum(n for n, _ in dict(modules).values()), sum(s for _, s in dict(modules).values())
    rows.append(f"| all | {n} | {s:.1f} |")
    summaries = [m.groups() for line in log.splitlines() if (m := SUMMARY.match(line.strip()))]
    if summaries:
        outcome, wall = summaries[-1]
        rows.append(f"\npytest: {outcome} in {float(wall):.0f} s")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", type=Path, help="a pytest log made with --durations=0 --durations-min=0")
    parser.add_argument("pytest_args", nargs="*", help="after --: pytest's arguments, for a run made here")
    args = parser.parse_args()
    if args.log:
        log = args.log.read_text()
    else:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=0", "--durations-min=0"]
        run = subprocess.run([*cmd, *args.pytest_args], capture_output=True, text=True)
        log = run.stdout + run.stderr
        print(log[-2000:], file=sys.stderr)
    print(table(log))


if __name__ == "__main__":
    main()
