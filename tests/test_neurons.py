"""LIF neuron, surrogates and the fused kernels against spikingjelly and NumPy references."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from spikingjelly.activation_based import neuron as sj_neuron
from spikingjelly.activation_based import surrogate as sj_surrogate

from evformer.kernels import numba_lif as K
from evformer.models import ATan, LIFNode, LIFParams, Sigmoid, reset_net, step_states
from evformer.models.layers import ConvBNLIF, LinearBNLIF


def _sj_lif(v_threshold=1.0, detach_reset=True, surrogate="sigmoid", alpha=4.0):
    sg = sj_surrogate.Sigmoid(alpha=alpha) if surrogate == "sigmoid" else sj_surrogate.ATan(alpha)
    return sj_neuron.LIFNode(
        tau=2.0,
        v_threshold=v_threshold,
        detach_reset=detach_reset,
        step_mode="m",
        surrogate_function=sg,
    )


@pytest.mark.parametrize("backend", ["torch", "numba"])
@pytest.mark.parametrize(
    "v_threshold,detach_reset,surrogate,alpha",
    [(1.0, True, "sigmoid", 4.0), (0.5, True, "sigmoid", 4.0), (1.0, False, "atan", 2.0)],
)
def test_lif_matches_spikingjelly_spikes_and_gradients(
    backend, v_threshold, detach_reset, surrogate, alpha
):
    g = torch.Generator().manual_seed(3)
    x = 1.5 * torch.randn(8, 3, 5, 7, generator=g)  # [T, ...]
    gout = torch.randn(x.shape, generator=g)
    ref = _sj_lif(v_threshold, detach_reset, surrogate, alpha)
    xr = x.clone().requires_grad_()
    sr = ref(xr)
    (sr * gout).sum().backward()
    ours = LIFNode(
        v_threshold=v_threshold,
        detach_reset=detach_reset,
        surrogate=surrogate,
        surrogate_alpha=alpha,
        backend=backend,
    )
    xo = x.clone().requires_grad_()
    so = ours(xo)
    (so * gout).sum().backward()
    assert 0.05 < float(sr.detach().mean()) < 0.95  # both regimes occur
    torch.testing.assert_close(so, sr, rtol=0, atol=0)
    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-5, atol=1e-6)


def test_lif_is_stateless_between_calls_and_step_states_carries_state():
    x = torch.randn(6, 4, 3)
    node = LIFNode(backend="torch")
    a = node(x)
    torch.testing.assert_close(node(x), a)  # no state survives a call
    with step_states():
        steps = torch.cat([node(x[t : t + 1]) for t in range(6)])
    torch.testing.assert_close(steps, a)
    assert torch.equal(node(x), a)


def test_hand_computed_lif_sequence():
    # tau 2, v_th 1: H = V + (X - V)/2; X = 1.5, 1.5, 0.4, 3 -> H = .75, 1.125 (fire), .2, 1.6
    x = torch.tensor([1.5, 1.5, 0.4, 3.0]).view(4, 1)
    for backend in ("torch", "numba"):
        s = LIFNode(backend=backend)(x)
        assert s.view(-1).tolist() == [0.0, 1.0, 0.0, 1.0]


def test_surrogate_gradients_match_their_formulas():
    x = torch.linspace(-2, 2, 41, dtype=torch.float64)
    s = torch.sigmoid(4 * x)
    torch.testing.assert_close(Sigmoid(4.0).grad(x), 4 * s * (1 - s))
    torch.testing.assert_close(ATan(2.0).grad(x), 1 / (1 + (math.pi / 2 * 2 * x) ** 2))
    # and the primitives' numerical derivatives
    for sg in (Sigmoid(3.0), ATan(1.5)):
        xr = x.clone().requires_grad_()
        sg.primitive(xr).sum().backward()
        torch.testing.assert_close(xr.grad, sg.grad(x))
    with pytest.raises(ValueError, match="alpha"):
        Sigmoid(-1.0)
    with pytest.raises(ValueError, match="unknown surrogate"):
        LIFNode(surrogate="tanh")
    with pytest.raises(ValueError, match="tau"):
        LIFParams(tau=1.0)


def test_reset_net_resets_spikingjelly_modules_inside():
    net = torch.nn.Sequential(LIFNode(), _sj_lif())
    net(torch.randn(3, 2, 4) + 1)
    assert isinstance(net[1].v, torch.Tensor)
    assert reset_net(net) is net
    assert net[1].v == 0.0


# -- kernels against the NumPy references ---------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(
    T=st.integers(1, 5),
    R=st.integers(1, 40),
    C=st.integers(1, 70),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([np.float32, np.float64]),
    kind=st.sampled_from([K.SIGMOID, K.ATAN]),
    detach=st.booleans(),
)
def test_bn_lif_kernels_match_numpy_reference(T, R, C, seed, dtype, kind, detach):
    rng = np.random.default_rng(seed)
    y = (2 * rng.normal(size=(T, R, C))).astype(dtype)
    scale = rng.uniform(0.5, 1.5, C).astype(dtype)
    shift = rng.normal(size=C).astype(dtype)
    mean = rng.normal(size=C).astype(dtype)
    gs = rng.normal(size=y.shape).astype(dtype)
    tau, vth, vr, alpha = (dtype(v) for v in (2.0, 1.0, 0.0, 4.0 if kind == K.SIGMOID else 2.0))
    spikes, packed = np.empty_like(y), np.empty(y.shape, np.uint8)
    K.bn_lif_forward(y, scale, shift, tau, vth, vr, spikes, packed, True, K.num_chunks(R))
    want = K.bn_lif_forward_ref(y, scale, shift, tau, vth, vr)
    np.testing.assert_array_equal(spikes, want)
    np.testing.assert_array_equal(packed, want)
    nchunks = K.num_chunks(R)
    gz = np.empty_like(y)
    pg, pgy = np.zeros((nchunks, C)), np.zeros((nchunks, C))
    K.bn_lif_backward(
        y, scale, shift, mean, gs, tau, vth, vr, alpha, kind, detach, gz, pg, pgy, nchunks
    )
    rgz, rsg, rsgy = K.bn_lif_backward_ref(
        y, scale, shift, mean, gs, tau, vth, vr, alpha, kind, detach
    )
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(gz, rgz, rtol=tol, atol=tol)
    np.testing.assert_allclose(pg.sum(0), rsg, rtol=tol, atol=tol * T * R)
    np.testing.assert_allclose(pgy.sum(0), rsgy, rtol=tol, atol=tol * T * R)
    # in-place use (grad_z aliasing grad_s) gives the same result
    gs2 = gs.copy()
    pg[:], pgy[:] = 0, 0
    K.bn_lif_backward(
        y, scale, shift, mean, gs2, tau, vth, vr, alpha, kind, detach, gs2, pg, pgy, nchunks
    )
    np.testing.assert_array_equal(gs2, gz)


@settings(max_examples=15, deadline=None)
@given(
    N=st.integers(1, 3),
    H=st.integers(1, 9),
    W=st.integers(1, 9),
    C=st.integers(1, 5),
    p=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_maxpool_backward_matches_reference_and_torch(N, H, W, C, p, seed):
    rng = np.random.default_rng(seed)
    s = (rng.random((N, H, W, C)) < p).astype(np.uint8)
    Ho, Wo = (H - 1) // 2 + 1, (W - 1) // 2 + 1
    g = rng.normal(size=(N, Ho, Wo, C))
    gin = np.zeros(s.shape)
    K.maxpool_backward(s, g, gin, 3, 2, 1, K.num_chunks(s.shape[0]))
    np.testing.assert_allclose(gin, K.maxpool_backward_ref(s, g, 3, 2, 1), atol=1e-12)
    # torch's max-pool routes the gradient to the same positions (ties included)
    st_ = torch.from_numpy(s).double().permute(0, 3, 1, 2).requires_grad_()
    torch.nn.functional.max_pool2d(st_, 3, 2, 1).backward(torch.from_numpy(g).permute(0, 3, 1, 2))
    np.testing.assert_allclose(gin, st_.grad.permute(0, 2, 3, 1).numpy(), atol=1e-12)


@settings(max_examples=10, deadline=None)
@given(M=st.integers(1, 600), C=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_channel_stats_and_affine_apply(M, C, seed):
    rng = np.random.default_rng(seed)
    y = (3 + rng.normal(size=(M, C))).astype(np.float32)
    mean, var = np.empty(C), np.empty(C)
    K.channel_stats(y, mean, var, K.num_chunks(M))
    np.testing.assert_allclose(mean, y.astype(np.float64).mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(var, y.astype(np.float64).var(0), rtol=1e-10, atol=1e-12)
    gz = rng.normal(size=(M, C)).astype(np.float32)
    a, b, d, m = (rng.normal(size=C).astype(np.float32) for _ in range(4))
    out = np.empty_like(y)
    K.affine_backward_apply(y, gz, m, a, b, d, out, K.num_chunks(M))
    np.testing.assert_allclose(out, a * gz + b * (y - m) + d, rtol=1e-5, atol=1e-5)


def test_pack_uint8_is_exact_or_refuses():
    for dtype in (np.float32, np.float64):
        ok = np.array([0, 1, 2, 3, 255, -0.0], dtype)
        out = np.empty(ok.size, np.uint8)
        assert K.pack_uint8(ok, out, 2) and out.tolist() == [0, 1, 2, 3, 255, 0]
        for bad in (0.5, -1.0, 256.0, np.nan, np.inf):
            x = np.array([0, 1, bad], dtype)
            assert not K.pack_uint8(x, np.empty(3, np.uint8), 2)


# -- fused layer units against the reference path ----------------------------------------------


def _unit_pair(make, g):
    torch.manual_seed(0)
    a = make("torch").double()
    b = make("numba").double()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        for m in (a, b):
            m.bn.weight.copy_(torch.linspace(0.5, 1.5, m.bn.num_features))
            m.bn.bias.copy_(torch.linspace(-0.3, 0.4, m.bn.num_features))
    return a, b


@pytest.mark.parametrize(
    "kind,pool,recompute",
    [("conv", False, False), ("conv", True, False), ("conv", True, True), ("linear", False, False)],
)
def test_fused_unit_equals_reference(kind, pool, recompute):
    g = torch.Generator().manual_seed(1)
    if kind == "conv":

        def make(backend):
            return ConvBNLIF(5, 12, pool=pool, backend=backend, recompute=recompute)

        x = torch.poisson(torch.full((3, 2, 5, 9, 7), 0.7, dtype=torch.float64), generator=g)
    else:

        def make(backend):
            return LinearBNLIF(6, 10, backend=backend)

        x = torch.randint(0, 3, (4, 2, 5, 6), generator=g).double()
    ref, fused = _unit_pair(make, g)
    for train in (True, False):
        ref.train(train)
        fused.train(train)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ref(xa), fused(xb)
        assert 0 < float(ya.detach().mean()) < 1
        torch.testing.assert_close(yb, ya, rtol=0, atol=0)
        gout = torch.randn(ya.shape, generator=g, dtype=torch.float64)
        (ya * gout).sum().backward()
        (yb * gout).sum().backward()
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-9, atol=1e-11)
        for (n, pa), pb in zip(ref.named_parameters(), fused.parameters()):
            torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-9, atol=1e-11, msg=n)
            pa.grad = pb.grad = None
        for (n, ba), bb in zip(ref.named_buffers(), fused.buffers()):
            torch.testing.assert_close(bb, ba, rtol=1e-12, atol=1e-12, msg=n)


def test_fused_unit_keeps_uint8_inputs_and_no_membrane_history():
    unit = ConvBNLIF(8, 16, pool=True, backend="numba")
    x = (torch.rand(2, 3, 8, 10, 10) > 0.6).float().requires_grad_()
    y = unit(x)
    saved = y.grad_fn.saved_tensors
    big = [t for t in saved if t.numel() >= x.numel()]
    # input spikes and pre-pool spikes as uint8; the conv output is the only float activation
    assert sorted(str(t.dtype) for t in big) == ["torch.float32", "torch.uint8", "torch.uint8"]
    # real-valued inputs cannot be packed and are kept as they are
    xr = torch.rand(2, 3, 8, 10, 10, requires_grad=True)
    assert any(
        t.dtype == torch.float32 and t.numel() == xr.numel() for t in unit(xr).grad_fn.saved_tensors
    )


# -- GPU paths --------------------------------------------------------------------------------


@pytest.mark.slow
def test_triton_kernels_match_numpy_reference_in_interpreter_mode():
    pytest.importorskip("triton")
    code = textwrap.dedent(
        """
        import numpy as np, torch
        from evformer.kernels import triton_lif as TK, numba_lif as K
        from evformer.kernels.types import LIFParams, Sigmoid, ATan
        rng = np.random.default_rng(0)
        for dt in (torch.float32, torch.float64):
            y = torch.from_numpy(2 * rng.normal(size=(3, 19, 37))).to(dt)
            sc, sh = torch.rand(37, dtype=dt) + 0.5, torch.randn(37, dtype=dt)
            mean, gs = torch.randn(37, dtype=dt), torch.randn(3, 19, 37, dtype=dt)
            s, pk = TK.bn_lif_forward(y, sc, sh, LIFParams(), True)
            ref = K.bn_lif_forward_ref(y.numpy(), sc.numpy(), sh.numpy(), 2.0, 1.0, 0.0)
            assert (s.numpy() == ref).all() and (pk.numpy() == ref).all()
            for sg in (Sigmoid(4.0), ATan(2.0)):
                for det in (True, False):
                    p = LIFParams(surrogate=sg, detach_reset=det)
                    gz, a, b = TK.bn_lif_backward(y, sc, sh, mean, gs, p)
                    r = K.bn_lif_backward_ref(y.numpy(), sc.numpy(), sh.numpy(), mean.numpy(),
                                              gs.numpy(), 2.0, 1.0, 0.0, sg.alpha, sg.kind, det)
                    tol = 1e-5 if dt == torch.float32 else 1e-12
                    np.testing.assert_allclose(gz.numpy(), r[0], rtol=tol, atol=tol)
                    np.testing.assert_allclose(a.numpy(), r[1], rtol=tol, atol=50 * tol)
                    np.testing.assert_allclose(b.numpy(), r[2], rtol=tol, atol=50 * tol)
        print("ok")
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fused_model_matches_cpu_reference():
    from evformer.models import create_model

    torch.manual_seed(0)
    kw = dict(embed_dim=64, depth=2, num_heads=4, T=3, img_size=32, num_classes=7)
    cpu = create_model("spikformer_cifar10dvs_2_256", backend="torch", **kw).double()
    gpu = create_model("spikformer_cifar10dvs_2_256", backend="auto", **kw).double().cuda()
    gpu.load_state_dict(cpu.state_dict())
    g = torch.Generator().manual_seed(0)
    x = torch.poisson(torch.full((2, 3, 2, 32, 32), 0.8, dtype=torch.float64), generator=g)
    for train in (True, False):
        cpu.train(train)
        gpu.train(train)
        a, b = cpu(x), gpu(x.cuda())
        torch.testing.assert_close(b.cpu(), a, rtol=1e-9, atol=1e-10)
        a.square().sum().backward()
        b.square().sum().backward()
        for (n, pa), pb in zip(cpu.named_parameters(), gpu.parameters()):
            torch.testing.assert_close(pb.grad.cpu(), pa.grad, rtol=1e-7, atol=1e-9, msg=n)
            pa.grad = pb.grad = None
