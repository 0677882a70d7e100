"""The CPU kernels on torch's OpenMP team equal the same kernels as Numba prange loops.

Both paths run the same chunk functions, so results must be bit-identical; the team path
must be found where torch runs on OpenMP (Linux wheels) and be skipped, not misused, for
inputs it cannot read as raw memory (non-contiguous, mixed dtypes).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evformer.kernels import omp_team as _omp_team
from evformer.kernels.cpu import NumbaKernels
from evformer.kernels.types import ATan, LIFParams, Sigmoid


def _torch_uses_openmp() -> bool:
    return "OpenMP" in torch.__config__.parallel_info().split("ATen parallel backend:")[-1]


@pytest.fixture
def use_team(monkeypatch):
    """``use_team(flag)``: route the kernels to torch's team (True) or to prange (False)."""

    def set_mode(flag: bool):
        monkeypatch.setenv("EVFORMER_OMP_TEAM", "1" if flag else "0")
        _omp_team.team.cache_clear()
        if flag:
            assert _omp_team.team() is not None

    yield set_mode
    _omp_team.team.cache_clear()


def test_team_is_found_where_torch_runs_on_openmp(monkeypatch):
    monkeypatch.setenv("EVFORMER_OMP_TEAM", "1")
    _omp_team.team.cache_clear()
    try:
        found = _omp_team.team()
        if _torch_uses_openmp() and any("omp" in p for p in _omp_team._loaded_openmp_libraries()):
            assert found is not None and "omp" in found.path
        monkeypatch.setenv("EVFORMER_OMP_TEAM", "0")
        _omp_team.team.cache_clear()
        assert _omp_team.team() is None
    finally:
        _omp_team.team.cache_clear()


def _both(use_team, fn):
    """``fn()`` on the team and on prange, as lists of numpy arrays."""
    if not _torch_uses_openmp():
        pytest.skip("torch is not built on OpenMP here")
    out = []
    for flag in (True, False):
        use_team(flag)
        res = fn()
        res = res if isinstance(res, tuple) else (res,)
        out.append([None if r is None else r.numpy().copy() for r in res])
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_team_equals_prange_for_every_kernel(use_team, dtype, threads):
    g = torch.Generator().manual_seed(0)
    T, R, C = 4, 777, 24  # rows not a multiple of the chunk count
    y = 2 * torch.randn(T, R, C, generator=g, dtype=dtype)
    scale = torch.rand(C, generator=g, dtype=dtype) + 0.5
    shift = torch.randn(C, generator=g, dtype=dtype)
    mean = torch.randn(C, generator=g, dtype=dtype)
    gs = torch.randn(T, R, C, generator=g, dtype=dtype)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for surrogate in (Sigmoid(4.0), ATan(2.0)):
            for detach in (True, False):
                p = LIFParams(surrogate=surrogate, detach_reset=detach)
                for packed in (True, False):
                    a, b = _both(
                        use_team,
                        lambda p=p, packed=packed: NumbaKernels.bn_lif_forward(
                            y, scale, shift, p, packed
                        ),
                    )
                    for u, v in zip(a, b):
                        assert (u is None) == (v is None)
                        if u is not None:
                            np.testing.assert_array_equal(u, v)
                a, b = _both(
                    use_team, lambda p=p: NumbaKernels.bn_lif_backward(y, scale, shift, mean, gs, p)
                )
                for u, v in zip(a, b):
                    np.testing.assert_array_equal(u, v)
        y2 = y.view(-1, C)
        a, b = _both(use_team, lambda: NumbaKernels.channel_stats(y2))
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)
        np.testing.assert_allclose(a[0], y2.double().mean(0).numpy(), rtol=1e-9, atol=1e-9)
        coeffs = [torch.randn(C, generator=g, dtype=dtype) for _ in range(3)]
        gz2 = gs.view(-1, C)
        a, b = _both(
            use_team,
            lambda: NumbaKernels.affine_backward_apply(
                y2, gz2, mean, *coeffs, torch.empty_like(y2)
            ),
        )
        np.testing.assert_array_equal(a[0], b[0])
        want = coeffs[0] * gz2 + coeffs[1] * (y2 - mean) + coeffs[2]
        np.testing.assert_allclose(a[0], want.numpy(), rtol=1e-5, atol=1e-5)
        s = (torch.rand(6, 9, 7, C, generator=g) < 0.3).to(torch.uint8)
        gp = torch.randn(6, 5, 4, C, generator=g, dtype=dtype)
        a, b = _both(use_team, lambda: NumbaKernels.maxpool_backward(s, gp, 3, 2, 1))
        np.testing.assert_array_equal(a[0], b[0])
        x = (torch.rand(T, R, C, generator=g) < 0.2).to(dtype) * 3
        a, b = _both(use_team, lambda: NumbaKernels.pack(x))
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[0], x.to(torch.uint8).numpy())
        packed_x = torch.from_numpy(a[0])
        a, b = _both(use_team, lambda: NumbaKernels.unpack(packed_x, dtype))
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[0], x.numpy())
        # values that are not uint8 counts: both paths refuse to pack
        x[1, 2, 3] = 0.5
        for flag in (True, False):
            use_team(flag)
            assert NumbaKernels.pack(x) is None
    finally:
        torch.set_num_threads(old)


def test_team_path_declines_inputs_it_cannot_read(use_team):
    # non-contiguous input, or per-channel vectors of another dtype: prange runs them
    from evformer.kernels.omp_team import team_for as _team_for

    if not _torch_uses_openmp():
        pytest.skip("torch is not built on OpenMP here")
    use_team(True)
    y = torch.randn(2, 10, 4)
    assert _team_for(torch.float32, y) is not None
    assert _team_for(torch.float32, y.transpose(1, 2)) is None
    assert _team_for(torch.float32, y, torch.ones(4, dtype=torch.float64)) is None
    assert _team_for(torch.bfloat16, y.bfloat16()) is None
    # a non-contiguous [M, C] view goes to the prange loop, with the same result
    yt = torch.randn(4, 10).t()
    gz, mean, a, b, d = torch.randn(10, 4), *(torch.randn(4) for _ in range(4))
    got = NumbaKernels.affine_backward_apply(yt, gz, mean, a, b, d, torch.empty(10, 4))
    want = NumbaKernels.affine_backward_apply(
        yt.contiguous(), gz, mean, a, b, d, torch.empty(10, 4)
    )
    torch.testing.assert_close(got, want, rtol=0, atol=0)


class _KernelDataset(torch.utils.data.Dataset):
    """Runs the LIF kernel in each item (in DataLoader workers: forked processes)."""

    def __init__(self, y):
        self.y = y

    def __len__(self):
        return 4

    def __getitem__(self, i):
        c = self.y.shape[-1]
        s, _ = NumbaKernels.bn_lif_forward(
            self.y, torch.ones(c), torch.zeros(c), LIFParams(), False
        )
        return s.sum()


def test_kernels_run_in_forked_dataloader_workers_after_the_parent_used_the_team(use_team):
    # GNU OpenMP does not survive fork with a live thread pool; DataLoader workers run
    # torch single-threaded, so the team there is the worker's own thread. A hang here
    # would stop the test at the DataLoader timeout instead of blocking the suite.
    if not _torch_uses_openmp():
        pytest.skip("torch is not built on OpenMP here")
    use_team(True)
    y = torch.randn(4, 5000, 32, generator=torch.Generator().manual_seed(3))
    c = y.shape[-1]
    want, _ = NumbaKernels.bn_lif_forward(y, torch.ones(c), torch.zeros(c), LIFParams(), False)
    loader = torch.utils.data.DataLoader(
        _KernelDataset(y), batch_size=2, num_workers=2, multiprocessing_context="fork", timeout=120
    )
    got = torch.cat(list(loader))
    torch.testing.assert_close(got, want.sum().expand(4), rtol=0, atol=0)
