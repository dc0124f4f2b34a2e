import os

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
