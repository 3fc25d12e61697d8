"""Test-session settings.

Triton decides when a kernel is *defined* (module import) whether it runs in the interpreter, so the
interpreter is switched on here, before any test imports `kernels`. On a machine with a GPU, run the
suite with TRITON_INTERPRET=0 to test the compiled kernels instead.

Shared helpers (seeded inputs, F32_EPS) are in tests/helpers.py, the tolerance table in tests/tolerances.py.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402  (after the interpreter switch, which must come first)
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One intra-op thread for the whole session: the test shapes are tiny, the interpreter's numpy is
    single-threaded, and on a shared 2-core machine spinning OpenMP threads only cost time. (The torchrun
    children of tests/train/test_distributed.py set OMP_NUM_THREADS=1 themselves.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
