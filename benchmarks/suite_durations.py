"""Where the test suite's time goes: per file and per kind, from pytest's JUnit XML.

    python -m pytest --junitxml=after.xml            # each test's setup + call + teardown seconds
    python benchmarks/suite_durations.py after.xml [before.xml]

Prints two Markdown tables (tests/README.md keeps the latest): seconds per test file, and per
kind of test. Under pytest-xdist the seconds are summed over workers (CPU-side work, not wall
time): the wall time is what pytest prints on its last line.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from collections import defaultdict

# Tests that start processes of their own (torchrun, spawn, the CLI in a subprocess).
MULTI_PROCESS = ("test_distributed.py", "test_two_ranks_give_the_single_process")
SUBPROCESS_CLI = ("test_cli_exits_2_naming_the_key", "test_print_config_shows_resolved_values",
                  "test_sigkill_then_rerun", "test_the_python_api_example_runs_as_written")


def kind(path: str, name: str, seconds: float) -> str:
    if any(marker in path or marker in name for marker in MULTI_PROCESS):
        return "multi-process launches (torchrun, spawn)"
    if any(marker in name for marker in SUBPROCESS_CLI):
        return "CLI in a subprocess"
    if seconds >= 5:
        return "end-to-end trainings (>= 5 s)"
    if seconds >= 0.5:
        return "tiny trainings (0.5-5 s)"
    return "unit tests (< 0.5 s)"


def read(path: str) -> list[tuple[str, str, float]]:
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        file = case.get("classname", "").replace(".", "/") + ".py"
        cases.append((file.rsplit("/", 1)[-1], case.get("name", ""), float(case.get("time") or 0.0)))
    return cases


def table(title: str, groups: list[dict[str, list[float]]], labels: list[str]) -> str:
    keys = sorted({key for group in groups for key in group}, key=lambda k: -sum(groups[0].get(k, [0.0])))
    header = f"| {title} | " + " | ".join(f"{label} tests | {label} s" for label in labels) + " |"
    lines = [header, "|---|" + "---:|" * (2 * len(labels))]
    for key in [*keys, "total"]:
        cells = []
        for group in groups:
            values = [v for k, vs in group.items() for v in vs] if key == "total" else group.get(key, [])
            cells += [str(len(values)) if values else "–", f"{sum(values):.0f}" if values else "–"]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(paths: list[str]) -> None:
    runs = [read(path) for path in paths]
    by_file, by_kind = [], []
    for cases in runs:
        files, kinds = defaultdict(list), defaultdict(list)
        for file, name, seconds in cases:
            files[file].append(seconds)
            kinds[kind(file, name, seconds)].append(seconds)
        by_file.append(files)
        by_kind.append(kinds)
    labels = ["after", "before"] if len(paths) == 2 else ["this run"]
    print(table("file", by_file, labels))
    print()
    print(table("kind", by_kind, labels))


if __name__ == "__main__":
    if not 1 <= len(sys.argv) - 1 <= 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
