"""Shared test set-up: threads per worker, the order tests start in, and the fault-injection counts.

The suite runs in parallel (pytest-xdist, ``-n auto`` in pyproject.toml): one worker per core,
each with one torch thread, since these tests are thousands of tiny ops where a second thread
only adds synchronisation. Tests that launch several processes of their own (torchrun, spawn)
share one ``xdist_group`` so that two such jobs never fight over the two cores, and the slow tests
start first so that the longest one is not the last to begin. ``python -m pytest -n 0`` runs
everything in one process (with two threads), as before.
"""

import os
from collections import Counter

WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, (os.cpu_count() or 1) // WORKERS))
if "PYTEST_XDIST_WORKER" in os.environ:  # before torch starts its pool; the worker's children inherit it
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(THREADS)

MAX_AUTO_WORKERS = 8  # the suite's tests are small: past a few workers, start-up and imports dominate


def pytest_xdist_auto_num_workers(config):
    return max(1, min(MAX_AUTO_WORKERS, os.cpu_count() or 1))


def pytest_collection_modifyitems(session, config, items):
    """Slow tests first (stable otherwise): with work handed out as workers free up, the long
    end-to-end runs overlap the many short tests instead of trailing after them."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True, scope="session")
def _cache(tmp_path_factory):
    """Derived files (manifest row indexes) go to a session folder, not the user's ~/.cache."""
    if "PREPRETRAIN_CACHE" not in os.environ:
        os.environ["PREPRETRAIN_CACHE"] = str(tmp_path_factory.mktemp("prepretrain-cache"))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of thousands of tiny ops (micro ViTs, L-BFGS), where a second
    thread only adds synchronisation; for ``-n 0`` runs (xdist workers have one already). Modules
    ask for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


FAULT_KEYS = ("faults_injected", "runs", "bit_exact", "same_losses", "checkpoints_lost", "hangs", "nonfinite_saved")


def _counts(config) -> Counter:
    counts = getattr(config, "_prepretrain_faults", None)
    if counts is None:
        counts = config._prepretrain_faults = Counter({key: 0 for key in FAULT_KEYS})
    return counts


@pytest.fixture(scope="session")
def fault_counts(request) -> Counter:
    """Counts of the fault-injection tests (test_faults.py, test_distributed.py), printed at the end."""
    return _counts(request.config)


def pytest_sessionfinish(session, exitstatus):
    """A worker hands its counts to the controller, which prints the sum."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["prepretrain_faults"] = dict(_counts(session.config))


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    counts = getattr(node, "workeroutput", {}).get("prepretrain_faults")
    if counts:
        _counts(node.config).update(counts)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    counts = getattr(config, "_prepretrain_faults", None)
    if counts and any(counts.values()):
        terminalreporter.section("fault injection")
        terminalreporter.write_line(
            f"{counts['faults_injected']} faults injected; {counts['bit_exact']} resumed runs compared bit-exactly "
            f"with an uninterrupted one (all equal); {counts['same_losses']} multi-rank resumes with the "
            f"uninterrupted losses; {counts['checkpoints_lost']} checkpoints lost or corrupted; "
            f"{counts['hangs']} hangs; {counts['nonfinite_saved']} non-finite tensors saved")


@pytest.fixture(scope="session")
def slurm_cluster():
    """A SLURM cluster this machine can submit to (CI starts a one-node one on localhost with
    ``scripts/local_slurm.sh start``). Without one: a skip on a developer's machine, a failure in CI,
    where every test must run."""
    import shutil
    import subprocess

    problem = ""
    if shutil.which("sbatch") is None:
        problem = "no sbatch on PATH"
    else:
        try:
            subprocess.run(["sinfo", "-h"], check=True, capture_output=True, timeout=20)
        except (OSError, subprocess.SubprocessError) as error:
            problem = f"sinfo failed: {error}"
    if problem:
        message = f"needs a SLURM cluster ({problem}): run scripts/local_slurm.sh start (as root)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return True
