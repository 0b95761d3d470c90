import os

import pytest
import torch

# Tests never touch the user's caches.
os.environ.setdefault("SAMFIT_CHECKPOINTS", "/nonexistent-samfit-checkpoints")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    root = tmp_path / "data"
    monkeypatch.setenv("SAMFIT_DATA", str(root))
    return root


@pytest.fixture
def one_thread():
    """One intra-op thread for short runs: no oversubscription of a shared CPU (faster and steadier)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
