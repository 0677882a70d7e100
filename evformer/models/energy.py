"""Theoretical energy of a spiking model, counted the way the Spikformer papers do.

Method (Spikformer V1/V2, after Hu et al. and Kundu et al.): every synaptic layer -- conv,
linear, and the two matrix products of self-attention -- has a dense cost ``MACs`` (multiply-
accumulates for one sample over all T steps). A layer fed by spikes only *accumulates* when
a spike arrives, so it costs ``SOPs = rate x MACs`` synaptic operations, where ``rate`` is
the measured mean input value per element and time step (a spike count of 2 after a
residual add counts twice); a layer fed by real values (the first conv on images, float
attention variants) costs ``MACs``. Energy: ``E = 0.9 pJ x SOPs + 4.6 pJ x MACs`` (45 nm
figures; the paper's "Power" column is the SOP term alone, e.g. V2-8-512 at T=1:
3.15 G SOPs -> 2.835 mJ).

Details that are choices (documented so numbers are comparable):

* Static images repeated over T: the first conv sees the same real input at every step; its
  MACs are counted once per sample (``E_MAC x FL_conv1`` in the papers' formula). Event
  frames are spike counts, so the first conv of a DVS model counts SOPs like any other.
* Attention ``q k^T v`` with spike q, k, v: the first product of two binary matrices
  accumulates only where both bits are 1, so its count is exact (``sum(A @ B)``); the second
  product (spike matrix times the integer matrix ``k^T v`` or ``q k^T``) costs
  ``rate(spikes) x MACs``. With one real operand the count is ``rate(spike operand) x MACs``;
  with two real operands (the float-attention variants), MACs.
  Softmax/normalisation arithmetic is not counted.
* The classification head (on time-averaged features) counts as MACs.

Firing rates come from running real data: :func:`energy_report` runs the model in eval
mode without gradients over the inputs you give it and averages per sample.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["E_AC_PJ", "E_MAC_PJ", "EnergyReport", "LayerEnergy", "energy_report"]

E_AC_PJ = 0.9  #: energy of one accumulate (synaptic operation), pJ, 45 nm
E_MAC_PJ = 4.6  #: energy of one multiply-accumulate, pJ, 45 nm


@dataclass
class _Acc:
    kind: str
    order: int
    macs: float = 0.0  # dense MACs
    sops: float = 0.0  # synaptic operations (spike-fed)
    mac_ops: float = 0.0  # MACs actually spent on real-valued inputs
    input_sum: float = 0.0
    input_numel: float = 0.0
    calls: int = 0


@dataclass
class _Probe:
    records: dict = field(default_factory=dict)
    static_input: torch.Tensor | None = None
    static_T: int = 1


_PROBE: contextvars.ContextVar[_Probe | None] = contextvars.ContextVar(
    "evformer_energy_probe", default=None
)


def probing() -> bool:
    """True while :func:`energy_report` runs a model (layers then record their inputs)."""
    return _PROBE.get() is not None


def mark_static_input(x_seq: torch.Tensor, T: int) -> None:
    """Tell the probe that ``x_seq`` is one real image repeated over ``T`` steps."""
    probe = _PROBE.get()
    if probe is not None:
        probe.static_input, probe.static_T = x_seq, T


def _is_spike_count(x: torch.Tensor) -> bool:
    return bool(((x >= 0) & (x == torch.round(x))).all())


def _is_binary(x: torch.Tensor) -> bool:
    return bool(((x == 0) | (x == 1)).all())


def _acc(key, kind: str) -> _Acc:
    probe = _PROBE.get()
    if key not in probe.records:
        probe.records[key] = _Acc(kind=kind, order=len(probe.records))
    return probe.records[key]


def _add(acc: _Acc, macs: float, x: torch.Tensor, spiking: bool, repeat: int = 1) -> None:
    acc.calls += 1
    acc.macs += macs
    acc.input_sum += float(x.double().sum())
    acc.input_numel += x.numel()
    if spiking:
        acc.sops += float(x.double().mean()) * macs
    else:
        acc.mac_ops += macs / repeat


def record_synapse(module: nn.Module, x: torch.Tensor, out: torch.Tensor | None) -> None:
    """Record one call of a conv/linear unit (``module.macs(x_shape, out_shape)``)."""
    probe = _PROBE.get()
    macs = float(module.macs(x.shape, None if out is None else out.shape))
    static = probe.static_input is not None and x is probe.static_input
    _add(
        _acc((id(module), ""), module.kind),
        macs,
        x,
        _is_spike_count(x),
        repeat=probe.static_T if static else 1,
    )


def _product(key, a: torch.Tensor, b: torch.Tensor, a_spikes: bool, b_spikes: bool) -> None:
    """Count ``a @ b`` (batched) into the record ``key``; ``*_spikes``: operand is binary."""
    acc = _acc(key, "attention")
    macs = float(math.prod(a.shape[:-1]) * a.shape[-1] * b.shape[-1])
    acc.calls += 1
    acc.macs += macs
    if a_spikes and b_spikes:
        # both operands spikes: an accumulate happens only where both bits are 1
        ops = float((a.double() @ b.double()).sum())
        acc.sops += ops
        acc.input_sum += ops
        acc.input_numel += macs
    elif a_spikes or b_spikes:
        s = a if a_spikes else b
        acc.sops += float(s.double().mean()) * macs
        acc.input_sum += float(s.double().sum())
        acc.input_numel += s.numel()
    else:
        acc.mac_ops += macs
        acc.input_sum += float(a.double().sum())
        acc.input_numel += a.numel()


def record_attention(module: nn.Module, q, k, v, kv_first: bool) -> None:
    """Record the two products of ``q k^T v`` (heads split: ``[T, B, h, N, d]``). The middle
    result (``k^T v`` or ``q k^T``) is an integer or real matrix, never spikes."""
    with torch.no_grad():
        sq, sk, sv = _is_binary(q), _is_binary(k), _is_binary(v)
        if kv_first:
            kt = k.transpose(-2, -1)
            _product((id(module), "k^T v"), kt, v, sk, sv)
            _product((id(module), "q (k^T v)"), q, kt @ v, sq, False)
        else:
            kt = k.transpose(-2, -1)
            _product((id(module), "q k^T"), q, kt, sq, sk)
            _product((id(module), "(q k^T) v"), q @ kt, v, False, sv)


def record_head(module: nn.Linear, feats: torch.Tensor) -> None:
    """Record the classification head (real-valued input: MACs)."""
    acc = _acc((id(module), ""), "linear")
    macs = float(math.prod(feats.shape[:-1]) * module.in_features * module.out_features)
    _add(acc, macs, feats, spiking=False)


@dataclass(frozen=True)
class LayerEnergy:
    """One synaptic layer, averaged per sample: ``rate`` is the mean input value per element
    and step, ``macs`` the dense cost, ``sops``/``mac_ops`` what is actually spent."""

    name: str
    kind: str
    rate: float
    macs: float
    sops: float
    mac_ops: float
    energy_mj: float


@dataclass(frozen=True)
class EnergyReport:
    """Per-layer and total operation counts and energy per sample (mJ)."""

    layers: tuple[LayerEnergy, ...]
    samples: int
    e_ac_pj: float
    e_mac_pj: float

    @property
    def total_sops(self) -> float:
        return sum(r.sops for r in self.layers)

    @property
    def total_mac_ops(self) -> float:
        return sum(r.mac_ops for r in self.layers)

    @property
    def total_dense_macs(self) -> float:
        return sum(r.macs for r in self.layers)

    @property
    def energy_sop_mj(self) -> float:
        """The papers' "Power" column: SOPs x E_AC."""
        return self.total_sops * self.e_ac_pj * 1e-9

    @property
    def energy_mac_mj(self) -> float:
        return self.total_mac_ops * self.e_mac_pj * 1e-9

    @property
    def energy_mj(self) -> float:
        return self.energy_sop_mj + self.energy_mac_mj

    def table(self) -> str:
        """Markdown table: one row per layer plus the totals."""
        lines = [
            "| layer | kind | rate | MACs (M) | SOPs (M) | MAC ops (M) | energy (uJ) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in self.layers:
            lines.append(
                f"| {r.name} | {r.kind} | {r.rate:.4f} | {r.macs / 1e6:.2f} | "
                f"{r.sops / 1e6:.2f} | {r.mac_ops / 1e6:.2f} | {r.energy_mj * 1e3:.2f} |"
            )
        lines.append(
            f"| total | | | {self.total_dense_macs / 1e6:.2f} | {self.total_sops / 1e6:.2f} | "
            f"{self.total_mac_ops / 1e6:.2f} | {self.energy_mj * 1e3:.2f} |"
        )
        return "\n".join(lines)


def _batches(inputs) -> Iterable[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        yield inputs
        return
    for item in inputs:
        yield item[0] if isinstance(item, (tuple, list)) else item


@contextlib.contextmanager
def _probe():
    probe = _Probe()
    token = _PROBE.set(probe)
    try:
        yield probe
    finally:
        _PROBE.reset(token)


def energy_report(
    model: nn.Module,
    inputs: torch.Tensor | Iterable,
    *,
    e_ac_pj: float = E_AC_PJ,
    e_mac_pj: float = E_MAC_PJ,
    max_batches: int | None = None,
    batch_dim: int = 0,
) -> EnergyReport:
    """Run ``inputs`` through ``model`` (eval mode, no grad) and count operations per layer.

    ``inputs``: one batch tensor (``[B, C, H, W]`` static or ``[B, T, C, H, W]`` events) or an
    iterable of batches (a DataLoader; ``(x, y)`` pairs are fine). The model's ``T`` applies
    to static input. Returns per-sample averages; ``report.energy_sop_mj`` is the papers'
    power column, ``report.energy_mj`` adds the real-valued MACs at ``e_mac_pj``.
    ``batch_dim``: the sample axis of the inputs (1 for a bare layer fed ``[T, B, ...]``).
    """
    names = {id(m): n or type(m).__name__ for n, m in model.named_modules()}
    was_training = model.training
    model.eval()
    samples = 0
    try:
        with torch.no_grad(), _probe() as probe:
            for i, x in enumerate(_batches(inputs)):
                if max_batches is not None and i >= max_batches:
                    break
                model(x)
                samples += x.shape[batch_dim]
    finally:
        model.train(was_training)
    if samples == 0:
        raise ValueError("energy_report: inputs contained no samples")
    rows = []
    for (mid, tag), acc in sorted(probe.records.items(), key=lambda kv: kv[1].order):
        name = names.get(mid, "?") + (f" [{tag}]" if tag else "")
        sops, mac_ops = acc.sops / samples, acc.mac_ops / samples
        rows.append(
            LayerEnergy(
                name=name,
                kind=acc.kind,
                rate=acc.input_sum / acc.input_numel if acc.input_numel else float("nan"),
                macs=acc.macs / samples,
                sops=sops,
                mac_ops=mac_ops,
                energy_mj=(sops * e_ac_pj + mac_ops * e_mac_pj) * 1e-9,
            )
        )
    return EnergyReport(tuple(rows), samples, e_ac_pj, e_mac_pj)
