import os

import pytest
import torch

# Tests never touch the user's caches.
os.environ.setdefault("SAMFIT_CHECKPOINTS", "/nonexistent-samfit-checkpoints")
# Under pytest-xdist every worker takes one thread: two workers on two cores, no oversubscription.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))


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


@pytest.fixture
def cli():
    """Run samfit's command line in this process (much faster than a subprocess per case): returns (exit code,
    stdout, error message), with the entry point's handling of SamfitError (exit 2 and its message)."""
    from typer.testing import CliRunner

    from samfit.cli import app
    from samfit.errors import SamfitError

    def invoke(*args) -> tuple[int, str, str]:
        result = CliRunner().invoke(app, [str(a) for a in args])
        if isinstance(result.exception, SamfitError):
            return 2, result.stdout, str(result.exception)
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        return result.exit_code, result.stdout, ""

    return invoke


@pytest.fixture
def printed_config(cli):
    """The settings `samfit run ARGS --print-config` resolves, as a dict."""
    import yaml

    def printed(*args) -> dict:
        code, out, message = cli("run", *args, "--print-config")
        assert code == 0, message
        return yaml.safe_load(out)

    return printed
