import os
from collections import Counter

import pytest
import torch

# Two cores: keep each test process to the threads the machine has.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True, scope="session")
def _cache(tmp_path_factory):
    """Derived files (manifest row indexes) go to a session folder, not the user's ~/.cache."""
    if "PREPRETRAIN_CACHE" not in os.environ:
        os.environ["PREPRETRAIN_CACHE"] = str(tmp_path_factory.mktemp("prepretrain-cache"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


FAULT_KEYS = ("faults_injected", "runs", "bit_exact", "same_losses", "checkpoints_lost", "hangs", "nonfinite_saved")


@pytest.fixture(scope="session")
def fault_counts(request) -> Counter:
    """Counts of the fault-injection tests (test_faults.py, test_distributed.py), printed at the end."""
    counts = getattr(request.config, "_prepretrain_faults", None)
    if counts is None:
        counts = request.config._prepretrain_faults = Counter({key: 0 for key in FAULT_KEYS})
    return counts


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    counts = getattr(config, "_prepretrain_faults", None)
    if counts:
        terminalreporter.section("fault injection")
        terminalreporter.write_line(
            f"{counts['faults_injected']} faults injected; {counts['bit_exact']} resumed runs compared bit-exactly "
            f"with an uninterrupted one (all equal); {counts['same_losses']} multi-rank resumes with the "
            f"uninterrupted losses; {counts['checkpoints_lost']} checkpoints lost or corrupted; "
            f"{counts['hangs']} hangs; {counts['nonfinite_saved']} non-finite tensors saved")
