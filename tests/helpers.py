"""Seeded random inputs and constants shared by the tests (fixtures live in tests/conftest.py).

Import as `from tests.helpers import rand`: pytest runs with --import-mode=importlib and the repository root on
sys.path (pyproject.toml), so `tests` is a namespace package.
"""

import torch
import torch.utils._python_dispatch

F32_EPS = torch.finfo(torch.float32).eps  # 2^-23: the eps the float32 kernels' norms default to (F.rms_norm's)


def rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Standard-normal values drawn in float64 from a generator seeded with `seed`, then rounded to `dtype`.

    Drawn in float64 whatever `dtype` is, so one seed gives the same values (up to that rounding) in every dtype,
    and a float64 oracle fed `x.double()` sees exactly the rounded inputs the op saw."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def rand32(*shape: int, seed: int = 0, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard-normal values drawn in float32, times `scale`, cast to `dtype`: the inputs of the Muon, Gram and
    dispatch tests. torch's float32 stream is not the float64 one rounded (for 16 or more elements the values
    differ outright), so this is a different set of inputs from `rand(..., dtype=torch.float32)`."""
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32) * scale).to(dtype)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Normwise relative error ||got - want||_F / ||want||_F, computed in float64."""
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


class LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor (in elements) any op returns while the mode is on, backward included:
    `with LargestTensor() as m: ...; m.numel, m.shape`. Pins peak-memory claims (e.g. no N x V logits).
    `last_dim`: only tensors whose last dimension is one of these sizes count (e.g. the vocabulary's)."""

    def __init__(self, last_dim: tuple[int, ...] | None = None):
        super().__init__()
        self.last_dim = last_dim
        self.numel, self.shape = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor):
                continue
            if self.last_dim and (t.dim() == 0 or t.shape[-1] not in self.last_dim):
                continue
            if t.numel() > self.numel:
                self.numel, self.shape = t.numel(), tuple(t.shape)
        return out
