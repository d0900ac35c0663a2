import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory):
    """A tiny SD1-shaped model with random weights, written once as a single .safetensors file."""
    from stablekit.models.ldm import LatentDiffusion
    from stablekit.weights import save_model
    from tests.tiny import TINY_SD1

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_model(LatentDiffusion(TINY_SD1), TINY_SD1, path)
    return path


@pytest.fixture
def one_thread():
    """torch on one thread for the test: what its subprocesses (OMP_NUM_THREADS=1, and torchrun's default) use,
    so their images compare bit for bit with this process's (a thread count changes float summation order)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
