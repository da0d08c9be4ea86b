import os

# Before torch is imported by any test module: see tether/__init__.py.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

from tether.configs import CONFIGS  # noqa: E402
from tether.model import WanTransformer  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are all Python overhead; a second intra-op thread only adds contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model():
    """The `tiny` config with seeded random weights, in eval mode."""
    torch.manual_seed(0)
    return WanTransformer(CONFIGS["tiny"]).eval()


@pytest.fixture(autouse=True)
def grad_mode_is_not_leaked():
    """A test (or code it calls in-process) that switches autograd off globally breaks every later test."""
    yield
    assert torch.is_grad_enabled(), "autograd was left disabled"
