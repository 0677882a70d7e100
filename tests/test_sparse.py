"""Event-driven (spike-sparse) conv / linear products on CPU.

References: torch's dense ``F.conv2d`` / ``convolution_backward`` (oneDNN) on the same
inputs, NumPy's ``nonzero`` for the spike rows, and the fused unit with the event-driven
path switched off.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from evformer.kernels import fused as functional
from evformer.kernels import omp_team as _omp_team
from evformer.kernels.cpu import NumbaKernels
from evformer.kernels.fused import SynapseSpec, synapse_bn_lif
from evformer.kernels.types import SPIKFORMER_LIF, SpikeRows

K = NumbaKernels


def _spikes(shape, density, gen, max_count=1, dtype=torch.float32):
    """Random spike counts in {0..max_count} with about ``density`` non-zeros."""
    on = torch.rand(shape, generator=gen) < density
    counts = torch.randint(1, max_count + 1, shape, generator=gen)
    return (on * counts).to(dtype)


def _rows(x2: torch.Tensor) -> SpikeRows:
    scan = K.scan_counts(x2)
    assert scan is not None
    packed, counts, has_big = scan
    return K.spike_rows(packed, counts, has_big)


# ---- spike rows


@pytest.mark.parametrize("max_count", [1, 3])
def test_scan_and_rows_equal_numpy(max_count):
    g = torch.Generator().manual_seed(0)
    x = _spikes((257, 70), 0.1, g, max_count)
    packed, counts, has_big = K.scan_counts(x)
    xn = x.numpy()
    np.testing.assert_array_equal(packed.numpy(), xn.astype(np.uint8))
    np.testing.assert_array_equal(counts, (xn != 0).sum(1))
    assert has_big == (max_count > 1)
    rows = K.spike_rows(packed, counts, has_big)
    r, c = np.nonzero(xn)  # row-major: columns ascending within a row
    np.testing.assert_array_equal(rows.indptr.numpy(), np.r_[0, np.cumsum((xn != 0).sum(1))])
    np.testing.assert_array_equal(rows.idx.numpy(), c)
    if max_count > 1:
        np.testing.assert_array_equal(rows.vals.numpy(), xn[r, c].astype(np.uint8))
    else:
        assert rows.vals is None
    assert rows.nnz == len(c) and rows.num_cols == 70


@pytest.mark.parametrize("bad", [0.5, -1.0, 256.0, float("nan"), float("inf")])
def test_scan_refuses_values_that_are_not_uint8_counts(bad):
    x = torch.zeros(300, 8)
    x[200, 3] = bad  # past the 64-value early check: the full pass must find it
    assert K.scan_counts(x) is None
    assert K.scan_counts(torch.rand(10, 8) + 0.1) is None  # images: early exit
    assert K.scan_counts(torch.zeros(8, 10).t()) is None  # not contiguous


def test_rows_of_an_all_zero_input():
    rows = _rows(torch.zeros(5, 4))
    assert rows.nnz == 0 and rows.indptr.tolist() == [0] * 6


# ---- products against oneDNN


CONV_CASES = [
    # N, Cin, Cout, H, W, k, stride, pad
    (3, 5, 7, 9, 11, 3, 1, 1),
    (2, 4, 6, 8, 8, 2, 2, 0),  # SCS stem conv
    (2, 3, 5, 9, 7, 3, 2, 1),
    (4, 6, 3, 5, 5, 1, 1, 0),
    (1, 2, 4, 6, 6, 5, 1, 2),
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("max_count", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_conv_forward_and_weight_grad_equal_dense(case, max_count, dtype):
    N, Cin, Cout, H, W, k, s, p = case
    g = torch.Generator().manual_seed(1)
    x = _spikes((N, H, W, Cin), 0.3, g, max_count, dtype)  # NHWC
    w = torch.randn(Cout, Cin, k, k, generator=g, dtype=dtype)
    bias = torch.randn(Cout, generator=g, dtype=dtype)
    x4 = x.permute(0, 3, 1, 2)
    ref = F.conv2d(x4, w, bias, s, p)
    Ho, Wo = ref.shape[2:]
    rows = _rows(x.reshape(-1, Cin))
    wr = w.permute(2, 3, 1, 0).contiguous()
    out = K.sparse_conv_forward(rows, N, H, W, wr, bias, (s, s), (p, p), Ho, Wo)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out, ref.permute(0, 2, 3, 1), rtol=tol, atol=tol)
    no_bias = K.sparse_conv_forward(rows, N, H, W, wr, None, (s, s), (p, p), Ho, Wo)
    torch.testing.assert_close(no_bias, (ref - bias.view(1, -1, 1, 1)).permute(0, 2, 3, 1))

    gy = torch.randn(N, Ho, Wo, Cout, generator=g, dtype=dtype)
    _, ref_w, _ = torch.ops.aten.convolution_backward(
        gy.permute(0, 3, 1, 2), x4, w, None, [s, s], [p, p], [1, 1], False, [0, 0], 1,
        [False, True, False],
    )  # fmt: skip
    gw = K.sparse_conv_weight_grad(rows, N, H, W, gy, (k, k), (s, s), (p, p))
    torch.testing.assert_close(gw.permute(3, 2, 0, 1), ref_w, rtol=tol, atol=tol)


def test_sparse_products_of_an_all_zero_input_are_the_bias_and_zero():
    rows = _rows(torch.zeros(2 * 4 * 4, 3))
    wr = torch.randn(3, 3, 3, 5)
    bias = torch.arange(5.0)
    out = K.sparse_conv_forward(rows, 2, 4, 4, wr, bias, (1, 1), (1, 1), 4, 4)
    assert torch.equal(out, bias.expand(2, 4, 4, 5))
    gw = K.sparse_conv_weight_grad(rows, 2, 4, 4, torch.randn(2, 4, 4, 5), (3, 3), (1, 1), (1, 1))
    assert torch.equal(gw, torch.zeros(3, 3, 3, 5))


def _torch_uses_openmp() -> bool:
    return "OpenMP" in torch.__config__.parallel_info().split("ATen parallel backend:")[-1]


@pytest.mark.parametrize("threads", [1, 2])
def test_team_and_prange_give_identical_results(monkeypatch, threads):
    if not _torch_uses_openmp():
        pytest.skip("torch is not built on OpenMP here")
    g = torch.Generator().manual_seed(2)
    x = _spikes((3, 10, 12, 9), 0.2, g, 2)
    w = torch.randn(3, 3, 9, 16, generator=g)
    gy = torch.randn(3, 10, 12, 16, generator=g)
    results = []
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for flag in ("1", "0"):
            monkeypatch.setenv("EVFORMER_OMP_TEAM", flag)
            _omp_team.team.cache_clear()
            assert (_omp_team.team() is not None) == (flag == "1")
            rows = _rows(x.reshape(-1, 9))
            out = K.sparse_conv_forward(rows, 3, 10, 12, w, None, (1, 1), (1, 1), 10, 12)
            gw = K.sparse_conv_weight_grad(rows, 3, 10, 12, gy, (3, 3), (1, 1), (1, 1))
            results.append((rows.indptr, rows.idx, rows.vals, out, gw))
    finally:
        torch.set_num_threads(old)
        _omp_team.team.cache_clear()
    for a, b in zip(*results):
        assert torch.equal(a, b)


def _gather_reference(x2, table, wr, gy):
    """Plain NumPy loops: ``out[q] = sum_k x[table[k, q]] @ wr[k]`` (-1: nothing) and its
    weight gradient ``gw[k] = sum_q outer(x[table[k, q]], gy[q])``."""
    x2, table, wr, gy = (
        t.double().numpy() if t.is_floating_point() else t.numpy() for t in (x2, table, wr, gy)
    )
    K, P = table.shape
    out = np.zeros((P, wr.shape[2]))
    gw = np.zeros(wr.shape)
    for k in range(K):
        for q in range(P):
            r = table[k, q]
            if r >= 0:
                out[q] += x2[r] @ wr[k]
                gw[k] += np.outer(x2[r], gy[q])
    return out, gw


@pytest.mark.parametrize("max_count", [1, 3])
@pytest.mark.parametrize("threads", [1, 2])
def test_gather_conv_products_equal_numpy_on_team_and_prange(monkeypatch, max_count, threads):
    """The masked conv's event-driven products over a gather table (rows read by several
    outputs, rows read by none, -1 entries) against NumPy loops, with bias; torch's OpenMP
    team and Numba's prange give bit-identical results."""
    g = torch.Generator().manual_seed(5)
    x2 = _spikes((40, 11), 0.3, g, max_count)
    table = torch.randint(-1, 40, (9, 23), generator=g)
    table[:, 0] = -1  # an output row that reads nothing: its bias
    wr = torch.randn(9, 11, 40, generator=g)  # 40 columns: two column chunks on 2 threads
    bias = torch.randn(40, generator=g)
    gy = torch.randn(23, 40, generator=g)
    want_out, want_gw = _gather_reference(x2, table, wr, gy)
    results = []
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    flags = ("1", "0") if _torch_uses_openmp() else ("0",)
    try:
        for flag in flags:
            monkeypatch.setenv("EVFORMER_OMP_TEAM", flag)
            _omp_team.team.cache_clear()
            rows = _rows(x2)
            out = K.gather_conv_forward(rows, table, wr, bias)
            gw = K.gather_conv_weight_grad(rows, table, gy)
            results.append((out, gw))
    finally:
        torch.set_num_threads(old)
        _omp_team.team.cache_clear()
    out, gw = results[0]
    np.testing.assert_allclose(
        out.double().numpy(), want_out + bias.double().numpy(), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(gw.double().numpy(), want_gw, rtol=1e-5, atol=1e-5)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kernel_major", [False, True])
@pytest.mark.parametrize(
    "cin, cout, block_bytes",
    [
        # Cout <= Cin: the output gradients gathered, all taps in one product in blocks of
        # three rows (a 9*3 float64 row of 216 bytes) / one product per tap (the 864-byte
        # weight is as large as a block)
        (4, 3, 9 * 3 * 8 * 3 + 1),
        (4, 3, 9 * 4 * 3 * 8),
        # Cin < Cout: products first (a tap's [T*(n_in+1), 3] float64 block), all nine taps
        # at once, in groups of four (4, 4, 1), or one tap at a time
        (3, 4, 10**6),
        (3, 4, "four taps"),
        (3, 4, 1),
    ],
)
def test_masked_conv_input_gradient_is_a_gather_equal_to_a_scatter(
    monkeypatch, cin, cout, block_bytes, kernel_major
):
    """GatherTaps.input_grad (each input row gathers what the rows that read it send back:
    their output gradients, or their per-tap products, whichever side is narrower) equals
    the scatter-add of every output row's per-tap gradient, in float64, with T = 2, for every
    blocking and for a weight in either memory order."""
    import evformer.kernels.fused as fused_mod
    from evformer.models.layers import kernel_major as to_kernel_major

    g = torch.Generator().manual_seed(6)
    B, H, W, T = 2, 5, 6, 2
    visible = torch.rand(B, H, W, generator=g) < 0.5
    b, ho, wo = visible.nonzero(as_tuple=True)
    in_rows = torch.full((B, H, W), -1, dtype=torch.long)
    in_rows[b, ho, wo] = torch.arange(b.numel())
    n_in = b.numel()
    taps = fused_mod.GatherTaps.build(in_rows, b, ho, wo, (3, 3), 1, 1, n_in)
    weight = torch.randn(cout, cin, 3, 3, generator=g, dtype=torch.float64)
    if kernel_major:
        weight = to_kernel_major(weight)
        assert weight.permute(2, 3, 1, 0).is_contiguous()
    gy = torch.randn(T * n_in, cout, generator=g, dtype=torch.float64)
    want = torch.zeros(T, n_in + 1, cin, dtype=torch.float64)
    wt = weight.permute(2, 3, 1, 0).reshape(9, cin, cout)
    for t in range(T):
        for k in range(9):
            want[t].index_add_(0, taps.index[k], gy[t * n_in : (t + 1) * n_in] @ wt[k].t())
    if block_bytes == "four taps":
        block_bytes = 4 * T * (n_in + 1) * cin * 8
    monkeypatch.setattr(fused_mod, "_GATHER_BLOCK_BYTES", block_bytes)
    got = taps.input_grad(gy, weight, T)
    torch.testing.assert_close(got, want[:, :n_in], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("density", [0.05, 0.9])  # event-driven and dense products
def test_linear_units_keep_input_major_weights(density):
    """LinearBNLIF's weight is in [Cin, Cout] memory order (what the event-driven product
    reads) with nn.Linear's values; loading a plain state dict and the gradients of a fused
    step keep that order, and output and gradients equal those of a plain weight."""
    from evformer.models.layers import LinearBNLIF

    torch.manual_seed(0)
    unit = LinearBNLIF(16, 24).train()
    w = unit.linear.weight
    assert w.t().is_contiguous() and not w.is_contiguous()
    plain = LinearBNLIF(16, 24).train()
    plain.load_state_dict({k: v.contiguous() for k, v in unit.state_dict().items()})
    assert plain.linear.weight.t().is_contiguous()
    plain.linear.weight = torch.nn.Parameter(w.detach().contiguous())
    x = (torch.rand(2, 3, 5, 16) < density).float()
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out, out_plain = unit(xa), plain(xb)
    torch.testing.assert_close(out, out_plain)
    g = torch.randn_like(out)
    out.backward(g)
    out_plain.backward(g)
    assert unit.linear.weight.grad.stride() == w.stride()
    torch.testing.assert_close(unit.linear.weight.grad, plain.linear.weight.grad)
    torch.testing.assert_close(xa.grad, xb.grad)


def test_weight_memory_order_does_not_change_the_initialisation(monkeypatch):
    """For one seed, a model whose conv and linear weights are kept in the kernels' memory
    order has exactly the weights of the same model with plain contiguous weights (random
    fills run in memory order, so the order must not leak into the drawn values)."""
    import evformer.models.layers as layers
    from evformer.models import create_model

    kw = dict(embed_dim=32, depth=1, num_heads=2, img_size=32, num_classes=10)

    def build(name):
        torch.manual_seed(0)
        return create_model(name, **kw).state_dict()

    for name in ("spikformer_cifar_4_384", "spikformer_v2_8_384"):
        ours = build(name)
        monkeypatch.setattr(layers, "kernel_major", lambda w: w)
        monkeypatch.setattr(layers, "input_major", lambda w: w)
        plain = build(name)
        monkeypatch.undo()
        assert ours.keys() == plain.keys()
        assert any(not v.is_contiguous() for v in ours.values())
        for k in ours:
            assert torch.equal(ours[k], plain[k]), k


def test_conv_units_keep_kernel_major_weights():
    """ConvBNLIF's weight is in [KH, KW, Cin, Cout] memory order (what the fused kernels
    read) with nn.Conv2d's values; loading a plain contiguous state dict and the gradient of
    a fused step keep that order, and the unit's output equals one with a plain weight."""
    from evformer.models.layers import ConvBNLIF

    torch.manual_seed(0)
    unit = ConvBNLIF(4, 6).train()
    w = unit.conv.weight
    assert w.permute(2, 3, 1, 0).is_contiguous() and not w.is_contiguous()
    plain = ConvBNLIF(4, 6).train()
    plain.load_state_dict({k: v.contiguous() for k, v in unit.state_dict().items()})
    assert plain.conv.weight.permute(2, 3, 1, 0).is_contiguous()
    plain.conv.weight = torch.nn.Parameter(unit.conv.weight.detach().contiguous())
    x = (torch.rand(2, 3, 4, 8, 8) < 0.3).float()
    out, out_plain = unit(x), plain(x)
    assert torch.equal(out, out_plain)
    out.sum().backward()
    out_plain.sum().backward()
    assert unit.conv.weight.grad.stride() == unit.conv.weight.stride()
    torch.testing.assert_close(unit.conv.weight.grad, plain.conv.weight.grad)


# ---- the fused unit: event-driven vs dense


@pytest.fixture
def sparse_calls(monkeypatch):
    """A list that grows by one at each event-driven forward product."""
    calls = []
    real = K.sparse_conv_forward

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(K, "sparse_conv_forward", staticmethod(counting))
    return calls


def _unit(kind, pool=False, recompute=False, dtype=torch.float32, bias=False):
    g = torch.Generator().manual_seed(3)
    if kind == "conv":
        w = nn.Parameter(torch.randn(8, 6, 3, 3, generator=g, dtype=dtype) * 0.5)
        spec_kw = {"stride": 1, "padding": 1, "pool": pool}
    else:
        w = nn.Parameter(torch.randn(8, 6, generator=g, dtype=dtype) * 0.5)
        spec_kw = {}
    b = nn.Parameter(torch.randn(8, generator=g, dtype=dtype)) if bias else None
    bn = nn.BatchNorm2d(8) if kind == "conv" else nn.BatchNorm1d(8)
    bn = bn.to(dtype)
    spec = SynapseSpec(kind, bn, SPIKFORMER_LIF, "numba", recompute=recompute, **spec_kw)
    return w, b, bn, spec


def _run_unit(x, w, b, bn, spec, gen):
    x = x.clone().requires_grad_(True)
    for p in (w, b, bn.weight, bn.bias):
        if p is not None:
            p.grad = None
    out = synapse_bn_lif(x, w, b, bn, spec)
    out.backward(torch.randn(out.shape, generator=gen, dtype=out.dtype))
    grads = [x.grad, w.grad, bn.weight.grad, bn.bias.grad] + ([b.grad] if b is not None else [])
    return [out.detach()] + [t.clone() for t in grads]


@pytest.mark.parametrize(
    "kind,pool,recompute,bias",
    [
        ("conv", False, False, False),
        ("conv", True, False, False),
        ("conv", False, True, False),
        ("linear", False, False, True),
        ("linear", False, True, False),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unit_event_driven_equals_dense(
    monkeypatch, sparse_calls, kind, pool, recompute, bias, dtype
):
    g = torch.Generator().manual_seed(4)
    shape = (3, 2, 6, 8, 8) if kind == "conv" else (3, 2, 10, 6)
    x = _spikes(shape, 0.08, g, 2, dtype)
    w, b, bn, spec = _unit(kind, pool, recompute, dtype, bias)
    results = {}
    for density in (0.0, 1.0):
        monkeypatch.setattr(functional, "SPARSE_MAX_DENSITY", density)
        bn.reset_running_stats()
        results[density] = _run_unit(x, w, b, bn, spec, torch.Generator().manual_seed(5))
    assert len(sparse_calls) == (2 if recompute else 1)  # only the event-driven run used it
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for dense, sparse in zip(results[0.0], results[1.0]):
        torch.testing.assert_close(sparse, dense, rtol=tol, atol=tol)


def test_unit_chooses_by_density(monkeypatch, sparse_calls):
    calls = sparse_calls
    monkeypatch.setattr(functional, "SPARSE_MAX_DENSITY", 0.12)
    w, b, bn, spec = _unit("conv")
    g = torch.Generator().manual_seed(6)
    synapse_bn_lif(_spikes((2, 2, 6, 8, 8), 0.05, g), w, b, bn, spec)
    assert len(calls) == 1
    synapse_bn_lif(_spikes((2, 2, 6, 8, 8), 0.3, g), w, b, bn, spec)
    assert len(calls) == 1  # too dense: oneDNN
    synapse_bn_lif(torch.rand(2, 2, 6, 8, 8, generator=g) * 0.1, w, b, bn, spec)
    assert len(calls) == 1  # real-valued input: oneDNN


def test_density_limit_shrinks_for_large_weights(monkeypatch, sparse_calls):
    monkeypatch.setattr(functional, "SPARSE_MAX_DENSITY", 0.12)
    small = torch.empty(384, 384, 3, 3)  # 5.3 MB
    assert functional.sparse_density_limit(small) == 0.12
    big = torch.empty(4096, 1024)  # 16 MiB: half the limit
    assert functional.sparse_density_limit(big) == pytest.approx(0.06)
    assert functional.sparse_density_limit(big.double()) == pytest.approx(0.03)
    # units at 9 % input density: dense with 16 MiB of weights, event-driven with 4 MiB
    x = _spikes((2, 2, 3, 1024), 0.09, torch.Generator().manual_seed(8))
    for cout, calls in ((4096, 0), (1024, 1)):
        bn = nn.BatchNorm1d(cout)
        spec = SynapseSpec("linear", bn, SPIKFORMER_LIF, "numba")
        synapse_bn_lif(x, nn.Parameter(torch.randn(cout, 1024) * 0.05), None, bn, spec)
        assert len(sparse_calls) == calls


def test_sparse_input_is_saved_smaller_than_uint8(monkeypatch):
    """At 5 % density the rows (int32 column + int64 row pointer) take well under the
    1 byte per input of uint8 counts."""
    monkeypatch.setattr(functional, "SPARSE_MAX_DENSITY", 0.12)
    w, b, bn, spec = _unit("linear")
    w = nn.Parameter(torch.randn(8, 64))
    x = _spikes((4, 8, 16, 64), 0.05, torch.Generator().manual_seed(7)).requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        synapse_bn_lif(x, w, b, bn, spec)
    int_bytes = sum(t.numel() * t.element_size() for t in saved if not t.is_floating_point())
    assert 0 < int_bytes < 0.5 * x.numel()


def test_density_setting_is_validated(monkeypatch):
    monkeypatch.setenv("EVFORMER_SPARSE_DENSITY", "0.3")
    assert functional._density_from_env() == 0.3
    for bad in ("high", "-0.1", "1.5", "nan"):
        monkeypatch.setenv("EVFORMER_SPARSE_DENSITY", bad)
        with pytest.raises(ValueError, match="EVFORMER_SPARSE_DENSITY"):
            functional._density_from_env()
