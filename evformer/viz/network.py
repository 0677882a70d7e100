"""What a spiking network does on an input: spikes per layer, firing rates, spiking
self-attention maps, and the theoretical energy of :func:`evformer.models.energy_report`.

:func:`record_spikes` and :func:`attention_maps` run the model once (eval mode, no
gradients, spiking state reset before and after, the training flag restored) with forward
hooks on its spiking layers; the hooks are removed afterwards, also when the forward pass
raises. The model is not changed and runs its default path.

Hook points. On the default fused path (``backend="numba"`` on CPU, ``"triton"`` on CUDA)
a ``conv|linear -> BatchNorm -> LIF [-> max-pool]`` unit and the SSA core
``LIF(scale * q k^T v)`` each run as one kernel, so their :class:`~evformer.models.LIFNode`
modules are never called and hooks on them would see nothing. The recorded layers are:

* every :class:`~evformer.models.ConvBNLIF` / :class:`~evformer.models.LinearBNLIF`: its
  output spikes, named by the unit's module path (``"blocks.0.mlp.fc1"``). For an SPS stage
  that ends with the 3x3/2 max-pool this is the pooled spike map (what the next layer
  receives), not the LIF output before the pool;
* the attention LIF of every :class:`~evformer.models.SpikingSelfAttention`: the input of
  its ``proj`` unit, named ``"<attention path>.attn_lif"``;
* any other ``LIFNode`` called outside such a unit (a user's own layers, the spike ``V``
  neuron ``qkv.lif`` of the float-attention variants): its output.

The names and the spikes are the same on the reference (``backend="torch"``) and the fused
path. Every recorded tensor is time first, in the layer's own layout: ``[T, B, C, H, W]``
for conv units, ``[T, B, N, C]`` for token units (N tokens, row-major over the patch grid).

Figures are built on ``matplotlib.figure.Figure`` (no pyplot state) and saved by
:func:`evformer.viz.save_figure`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from evformer.engine.batchnorm import recalibrate_batchnorm
from evformer.models.energy import EnergyReport
from evformer.models.layers import ConvBNLIF, LinearBNLIF, SpikingSelfAttention
from evformer.models.neurons import LIFNode, reset_net

__all__ = [
    "AttentionMaps",
    "SpikeRecord",
    "attention_figure",
    "attention_maps",
    "calibrate_batchnorm",
    "energy_figure",
    "energy_table",
    "firing_rate_figure",
    "record_spikes",
    "spike_raster_figure",
]


# -- records -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpikeRecord:
    """Spikes of every recorded layer of one forward pass (see the module docstring).

    ``names[i]`` is a module path, ``spikes[i]`` its spikes as a uint8 array ``[T, B, ...]``
    (0/1; time steps first, then the samples, then the layer's own neuron axes), in the
    order the layers first fired during the pass. ``output`` is what the model returned
    (detached, on the CPU). ``record["blocks.0.mlp.fc1"]`` returns one layer's array.
    """

    names: tuple[str, ...]
    spikes: tuple[np.ndarray, ...]
    output: Any = None

    def __post_init__(self) -> None:
        if len(self.names) != len(self.spikes):
            raise ValueError(f"{len(self.names)} names for {len(self.spikes)} spike arrays")

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.spikes[self.index(name)]

    def index(self, layer: str | int) -> int:
        """Position of ``layer`` (a name, or an index into ``names``)."""
        if isinstance(layer, bool) or not isinstance(layer, (str, int, np.integer)):
            raise TypeError(f"layer: expected a layer name or index, got {layer!r}")
        if isinstance(layer, str):
            if layer not in self.names:
                raise ValueError(
                    f"layer: {layer!r} was not recorded; recorded layers: {', '.join(self.names)}"
                )
            return self.names.index(layer)
        if not -len(self.names) <= int(layer) < len(self.names):
            raise ValueError(f"layer: index {layer} out of range for {len(self.names)} layers")
        return int(layer) % len(self.names)

    def firing_rates(self, *, sample: int | None = None) -> np.ndarray:
        """``[layers, T]`` float64: mean spikes per neuron and time step of every layer, over
        all samples (``sample=None``) or one sample (an index into axis 1)."""
        if not self.names:
            return np.zeros((0, 0))
        steps = {a.shape[0] for a in self.spikes}
        if len(steps) != 1:
            raise ValueError(f"layers have different numbers of time steps {sorted(steps)}")
        rows = []
        for name, a in zip(self.names, self.spikes):
            if sample is not None:
                a = a[:, _check_sample(sample, a, name)]
            rows.append(a.reshape(a.shape[0], -1).mean(axis=1, dtype=np.float64))
        return np.stack(rows)


@dataclass(frozen=True)
class AttentionMaps:
    """Spiking self-attention maps of one SSA layer.

    ``maps [T, B, heads, N, N]`` (float64): ``maps[t, b, h, i, j]`` is the product of head
    ``h``'s spike query of token ``i`` and spike key of token ``j`` at step ``t``, i.e. the
    number of the head's ``head_dim`` channels in which both spike (an integer in
    ``0..head_dim``). Unscaled and unnormalised: SSA has no softmax; the layer computes
    ``LIF(scale * (Q K^T) V)`` with ``scale`` (0.125, 0.25 in the DVS models) and the
    attention LIF threshold 0.5, so ``scale * maps`` is the weight each value spike gets.
    ``grid`` is the token grid ``(rows, cols)`` (N = rows * cols, tokens row-major) when known.
    """

    name: str
    maps: np.ndarray
    scale: float
    head_dim: int
    grid: tuple[int, int] | None = None

    @property
    def num_heads(self) -> int:
        return self.maps.shape[2]

    def mean_over_time(self) -> np.ndarray:
        """``[B, heads, N, N]``: the maps averaged over the T time steps."""
        return self.maps.mean(axis=0)


# -- running a model with hooks ------------------------------------------------------------


def _check_model_input(model: nn.Module, x: torch.Tensor) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"x: expected a torch.Tensor (the model's input, e.g. [B, C, H, W] images or "
            f"[B, T, C, H, W] event frames), got {type(x).__name__}"
        )


@contextlib.contextmanager
def _hooks() -> Iterator[list]:
    """Collects hook handles; removes every one of them on exit, also on an exception."""
    handles: list = []
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()


def _run(model: nn.Module, x: torch.Tensor) -> Any:
    """One forward pass in eval mode without gradients; state reset before and after, the
    training flag restored."""
    was_training = model.training
    reset_net(model)
    model.eval()
    try:
        with torch.no_grad():
            return model(x)
    finally:
        model.train(was_training)
        reset_net(model)


def _detach(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.detach().cpu()
    if isinstance(out, (tuple, list)):
        return type(out)(_detach(o) for o in out)
    return out


def _layer_patterns(layers: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if layers is None:
        return None
    pats = (layers,) if isinstance(layers, str) else tuple(layers)
    if not pats or not all(isinstance(p, str) for p in pats):
        raise TypeError(f"layers: expected a name pattern or a list of them, got {layers!r}")
    return pats


def record_spikes(
    model: nn.Module,
    x: torch.Tensor,
    *,
    layers: str | Sequence[str] | None = None,
) -> SpikeRecord:
    """Run ``x`` through ``model`` once and record the output spikes of every spiking layer.

    ``x``: the model's input as it is normally called (``[B, C, H, W]`` images or
    ``[B, T, C, H, W]`` event frames for a Spikformer; ``[T, B, ...]`` for a bare layer).
    ``layers``: shell-style patterns on the layer names (``"blocks.*"``) to keep only some
    layers (saves memory); None keeps all. Eval mode, no gradients, the model's own
    (default: fused) path; which modules are hooked and what is recorded for each is in the
    module docstring. A layer called several times in one pass (the models' single-step
    mode calls it once per time step) has its calls concatenated along the time axis.
    """
    _check_model_input(model, x)
    patterns = _layer_patterns(layers)
    collected: dict[str, list[torch.Tensor]] = {}
    active_units = [0]  # > 0 while a unit's forward runs (its own LIFNode is then skipped)

    def keep(name: str) -> bool:
        return patterns is None or any(fnmatch.fnmatchcase(name, p) for p in patterns)

    def store(name: str, t: torch.Tensor) -> None:
        collected.setdefault(name, []).append(t.detach().to("cpu", torch.uint8))

    def on_unit_enter(module, args) -> None:
        active_units[0] += 1

    def on_unit_exit(name: str) -> Callable:
        def hook(module, args, out) -> None:
            active_units[0] -= 1
            if keep(name):
                store(name, out)

        return hook

    def on_attn_lif(name: str) -> Callable:
        def hook(module, args) -> None:
            if keep(name):
                store(name, args[0])

        return hook

    def on_lif(name: str) -> Callable:
        def hook(module, args, out) -> None:
            if active_units[0] == 0 and keep(name):
                store(name, out)

        return hook

    modules = dict(model.named_modules())
    attn_lifs = {id(m.attn_lif) for m in modules.values() if isinstance(m, SpikingSelfAttention)}
    with _hooks() as handles:
        for path, m in modules.items():
            name = path or type(m).__name__  # the model itself may be a single layer
            if isinstance(m, (ConvBNLIF, LinearBNLIF)):
                handles.append(m.register_forward_pre_hook(on_unit_enter))
                handles.append(m.register_forward_hook(on_unit_exit(name)))
            elif isinstance(m, SpikingSelfAttention):
                lif_name = f"{path}.attn_lif" if path else "attn_lif"
                handles.append(m.proj.register_forward_pre_hook(on_attn_lif(lif_name)))
            elif isinstance(m, LIFNode) and id(m) not in attn_lifs:
                handles.append(m.register_forward_hook(on_lif(name)))
        output = _run(model, x)
    names = tuple(collected)
    spikes = tuple(torch.cat(collected[n]).numpy() for n in names)
    return SpikeRecord(names, spikes, _detach(output))


def _select_attention(model: nn.Module, block: int | str) -> tuple[str, SpikingSelfAttention]:
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, SpikingSelfAttention)]
    if not found:
        raise ValueError(f"model: {type(model).__name__} has no SpikingSelfAttention layer")
    if isinstance(block, str):
        for n, m in found:
            if n == block:
                return n, m
        raise ValueError(
            f"block: no SpikingSelfAttention at {block!r}; there are: "
            f"{', '.join(n or '<model>' for n, _ in found)}"
        )
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)):
        raise TypeError(f"block: expected an int index or a module path, got {block!r}")
    if not -len(found) <= block < len(found):
        raise ValueError(f"block: index {block} out of range for {len(found)} attention layers")
    return found[block]


def attention_maps(
    model: nn.Module,
    x: torch.Tensor,
    *,
    block: int | str = -1,
) -> AttentionMaps:
    """The spiking self-attention maps ``Q K^T`` per head of one SSA layer on input ``x``.

    ``block``: an index among the model's :class:`~evformer.models.SpikingSelfAttention`
    layers in module order (for a Spikformer: the encoder block, -1 the last) or a module
    path (``"blocks.1.attn"``). ``x`` as :func:`record_spikes`. The spike Q and K are the
    output of the layer's ``qkv`` unit (recorded by :func:`record_spikes` on the model's
    default path, split into heads by the layer itself); see :class:`AttentionMaps` for the values
    and the scale. Only the spiking variant (``attention="ssa"``) has spike Q and K.
    """
    _check_model_input(model, x)
    name, layer = _select_attention(model, block)
    if layer.attention != "ssa":
        raise ValueError(
            f"block: {name!r} uses attention={layer.attention!r}; attention maps of spike Q and "
            f"K exist for attention='ssa' only"
        )
    qkv_name = f"{name}.qkv" if name else "qkv"
    rec = record_spikes(model, x, layers=qkv_name)
    if qkv_name not in rec.names:
        raise ValueError(f"block: {name!r} was not called by the model's forward pass")
    qkv = torch.from_numpy(rec[qkv_name]).to(torch.float64)  # [T, B, N, 3D] spikes
    D = layer.dim
    q, k = (layer._heads(t) for t in qkv.split(D, dim=-1)[:2])  # [T, B, heads, N, d]
    maps = (q @ k.transpose(-2, -1)).numpy()
    grid = None
    p = getattr(model, "patch_size", None)
    if isinstance(p, int) and x.dim() >= 4:
        rows, cols = x.shape[-2] // p, x.shape[-1] // p
        grid = (rows, cols) if rows * cols == maps.shape[-1] else None
    label = name or type(layer).__name__
    return AttentionMaps(label, maps, float(layer.scale), D // layer.num_heads, grid)


def calibrate_batchnorm(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Set the running statistics of every BatchNorm in ``model`` to the batch statistics of
    ``x`` (one training-mode forward pass without gradients, cumulative average: mean and
    unbiased variance of each BatchNorm's own input), then leave the model in eval mode.

    For looking inside a randomly initialised model: with the default running statistics
    (mean 0, variance 1) its deeper layers are often silent in eval mode, so an "untrained"
    comparison would measure the statistics, not the weights. Changes nothing else (the
    momenta are restored); returns ``model``.
    """
    _check_model_input(model, x)
    if not recalibrate_batchnorm(model, [x]):
        raise ValueError(f"model: {type(model).__name__} has no BatchNorm layer")
    return model


# -- figures -------------------------------------------------------------------------------


def _check_sample(sample: int, a: np.ndarray, what: str) -> int:
    if isinstance(sample, bool) or not isinstance(sample, (int, np.integer)):
        raise TypeError(f"sample: expected an int, got {sample!r}")
    if a.ndim < 2 or not 0 <= sample < a.shape[1]:
        n = a.shape[1] if a.ndim >= 2 else 0
        raise ValueError(f"sample: {sample} out of range for {n} samples in {what}")
    return int(sample)


def _records(record) -> dict[str, SpikeRecord]:
    if isinstance(record, SpikeRecord):
        return {"": record}
    if isinstance(record, Mapping) and record:
        if not all(isinstance(r, SpikeRecord) for r in record.values()):
            raise TypeError("record: every value of the mapping must be a SpikeRecord")
        recs = {str(k): v for k, v in record.items()}
        first = next(iter(recs.values())).names
        for label, r in recs.items():
            if r.names != first:
                raise ValueError(
                    f"record: {label!r} has other layers than the first record; compare records "
                    f"of the same model"
                )
        return recs
    raise TypeError(
        f"record: expected a SpikeRecord or a non-empty {{label: SpikeRecord}} mapping, got "
        f"{type(record).__name__}"
    )


def firing_rate_figure(
    record: SpikeRecord | Mapping[str, SpikeRecord],
    *,
    sample: int | None = None,
    vmax: float | None = None,
) -> Figure:
    """Firing rate (mean spikes per neuron and time step) of every layer at every time step.

    One heat map ``layers x T`` per record (pass ``{"trained": a, "untrained": b}`` to compare
    records of the same model; all maps share one colour scale, 0 to ``vmax`` or the largest
    rate), and a last panel with each layer's rate averaged over T, one line per record.
    ``sample``: one sample's rates instead of the mean over the batch.
    """
    recs = _records(record)
    rates = {label: r.firing_rates(sample=sample) for label, r in recs.items()}
    names = next(iter(recs.values())).names
    if not names:
        raise ValueError("record: no layer was recorded")
    L = len(names)
    hi = float(vmax) if vmax is not None else max(float(r.max()) for r in rates.values())
    hi = hi if hi > 0 else 1.0
    k = len(recs)
    fig = Figure(figsize=(2.6 * k + 3.6, 0.24 * L + 1.6), layout="constrained")
    axes = fig.subplots(1, k + 1, sharey=True, gridspec_kw={"width_ratios": [2] * k + [1.4]})
    im = None
    for ax, (label, r) in zip(axes[:-1], rates.items()):
        im = ax.imshow(r, aspect="auto", cmap="viridis", vmin=0.0, vmax=hi, interpolation="nearest")
        ax.set_xlabel("time step")
        T = r.shape[1]
        ax.set_xticks(range(T) if T <= 16 else range(0, T, max(1, T // 8)))
        ax.set_title(label or f"{L} layers, T = {T}", fontsize=9)
    axes[0].set_yticks(range(L), names, fontsize=7)
    fig.colorbar(im, ax=list(axes[:-1]), label="spikes / neuron / step", shrink=0.8)
    prof = axes[-1]
    for label, r in rates.items():
        prof.plot(r.mean(axis=1), np.arange(L), marker="o", ms=3, label=label or None)
    prof.set_ylim(L - 0.5, -0.5)
    prof.set_xlabel("mean over T")
    prof.grid(alpha=0.3)
    if k > 1:
        prof.legend(fontsize=8, loc="best")
    return fig


def _neuron_indices(neurons, M: int, rng: np.random.Generator | None) -> np.ndarray:
    if rng is not None and not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng: expected a numpy.random.Generator or None, got {rng!r}")
    if isinstance(neurons, (int, np.integer)) and not isinstance(neurons, bool):
        if neurons < 1:
            raise ValueError(f"neurons: expected a count >= 1, got {neurons}")
        n = min(int(neurons), M)
        if rng is None:  # evenly spaced: deterministic without a generator
            return np.unique(np.round(np.linspace(0, M - 1, n)).astype(np.int64))
        return np.sort(rng.choice(M, size=n, replace=False))
    try:
        idx = np.asarray(neurons)
    except (TypeError, ValueError):
        idx = None
    if idx is None or idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"neurons: expected a count or a sequence of flat indices, got {neurons!r}")
    if idx.min() < 0 or idx.max() >= M:
        raise ValueError(f"neurons: indices must lie in [0, {M}) (neurons per sample)")
    return idx.astype(np.int64)


def spike_raster_figure(
    record: SpikeRecord,
    layer: str | int,
    *,
    neurons: int | Sequence[int] = 64,
    sample: int = 0,
    rng: np.random.Generator | None = None,
    label: str | None = None,
) -> Figure:
    """Spike raster of some neurons of one layer for one sample: a tick at (time step,
    neuron) for every spike.

    ``neurons``: how many (an evenly spaced subset without ``rng``, a random one drawn from
    ``rng``) or which, as flat indices into the layer's per-sample neuron axes (C-order:
    ``(C, H, W)`` for conv units, ``(N, C)`` for token units). The top panel is the whole
    layer's firing rate at each step for that sample; ``axes[1]`` holds the raster (one
    scatter, y = row of the chosen neuron, in the order of the indices). ``label`` (e.g.
    which model) starts the title.
    """
    if not isinstance(record, SpikeRecord):
        raise TypeError(f"record: expected a SpikeRecord, got {type(record).__name__}")
    i = record.index(layer)
    name, a = record.names[i], record.spikes[i]
    s = a[:, _check_sample(sample, a, name)].reshape(a.shape[0], -1)  # [T, M]
    T, M = s.shape
    idx = _neuron_indices(neurons, M, rng)
    rows, steps = np.nonzero(s[:, idx].T)  # spike of chosen neuron rows[k] at steps[k]
    fig = Figure(figsize=(max(5.0, 0.35 * T + 2.5), 1.6 + min(0.12 * len(idx), 8.0)))
    fig.set_layout_engine("constrained")
    ax_rate, ax = fig.subplots(
        2, 1, sharex=True, gridspec_kw={"height_ratios": [1, 3.5 if len(idx) > 8 else 2]}
    )
    ax_rate.bar(np.arange(T), s.mean(axis=1, dtype=np.float64), width=0.8, color="0.5")
    ax_rate.set_ylabel("layer rate", fontsize=8)
    ax_rate.set_title(
        f"{label + ': ' if label else ''}{name}, sample {sample}: {len(idx)} of {M} neurons\n"
        f"layer rate {s.mean():.3f} spikes / neuron / step",
        fontsize=9,
    )
    ax.scatter(steps, rows, marker="|", s=80, linewidths=1.5, color="k")
    ax.set_xlim(-0.5, T - 0.5)
    ax.set_ylim(len(idx) - 0.5, -0.5)
    ax.set_xlabel("time step")
    ax.set_ylabel("neuron (flat index)")
    if len(idx) <= 24:
        ax.set_yticks(range(len(idx)), [str(j) for j in idx], fontsize=7)
    if T <= 32:
        ax.set_xticks(range(T))
    return fig


def _grid_for(maps: AttentionMaps) -> tuple[int, int]:
    if maps.grid is not None:
        return maps.grid
    N = maps.maps.shape[-1]
    side = math.isqrt(N)
    if side * side != N:
        raise ValueError(
            f"token: the token grid of {maps.name!r} is unknown and N = {N} is not square"
        )
    return side, side


def attention_figure(
    maps: AttentionMaps,
    *,
    sample: int = 0,
    time: int | None = None,
    token: int | None = None,
    direction: str = "from",
    heads: Sequence[int] | None = None,
    scaled: bool = False,
    label: str | None = None,
) -> Figure:
    """One panel per head of an SSA layer's ``Q K^T`` (:func:`attention_maps`) for one sample.

    ``time``: one time step, or None for the mean over T. Without ``token`` each panel is the
    ``N x N`` map (row = query token, column = key token). With ``token = i`` each panel is
    a map over the token grid: ``direction="from"`` shows row i (how strongly token i's query
    meets every key), ``"to"`` column i (every query against token i's key); the token is
    marked with a red x. All panels share one colour scale from 0; ``scaled`` multiplies
    by the layer's scale (the factor the model applies before the attention LIF). ``label``
    (e.g. which model) starts the title.
    """
    if not isinstance(maps, AttentionMaps):
        raise TypeError(f"maps: expected AttentionMaps, got {type(maps).__name__}")
    m = maps.maps[:, _check_sample(sample, maps.maps, maps.name)]  # [T, heads, N, N]
    T, H, N, _ = m.shape
    if time is None:
        m, when = m.mean(axis=0), f"mean over T = {T}"
    else:
        if isinstance(time, bool) or not isinstance(time, (int, np.integer)):
            raise TypeError(f"time: expected an int or None, got {time!r}")
        if not 0 <= time < T:
            raise ValueError(f"time: step {time} out of range for T = {T}")
        m, when = m[time], f"step {time}"
    if scaled:
        m = m * maps.scale
    sel = list(range(H)) if heads is None else [int(h) for h in heads]
    if not sel or any(not 0 <= h < H for h in sel):
        raise ValueError(f"heads: expected indices in [0, {H}), got {heads!r}")
    if direction not in ("from", "to"):
        raise ValueError(f"direction: expected 'from' or 'to', got {direction!r}")
    if token is not None:
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
            raise TypeError(f"token: expected an int or None, got {token!r}")
        if not 0 <= token < N:
            raise ValueError(f"token: {token} out of range for N = {N} tokens")
        rows, cols = _grid_for(maps)
        panels = [(m[h, token] if direction == "from" else m[h, :, token]) for h in sel]
        panels = [p.reshape(rows, cols) for p in panels]
    else:
        panels = [m[h] for h in sel]
    hi = max(float(p.max()) for p in panels)
    ncols = min(len(sel), 4)
    nrows = math.ceil(len(sel) / ncols)
    fig = Figure(figsize=(2.7 * ncols + 1.0, 2.6 * nrows + 0.5), layout="constrained")
    axes = np.asarray(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    im = None
    for ax, h, p in zip(axes, sel, panels):
        im = ax.imshow(p, cmap="magma", vmin=0.0, vmax=hi if hi > 0 else 1.0)
        ax.set_title(f"head {h}", fontsize=9)
        if token is not None:
            r, c = divmod(token, cols)
            ax.plot([c], [r], marker="x", color="red", ms=8, mew=2)
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            ax.set_xlabel("key token", fontsize=8)
            ax.set_ylabel("query token", fontsize=8)
    for ax in axes[len(sel) :]:
        ax.remove()
    what = "scale x Q K^T" if scaled else f"Q K^T (co-active of d = {maps.head_dim} channels)"
    if token is not None:
        what += f", token {token} as {'query' if direction == 'from' else 'key'}"
    prefix = f"{label}: " if label else ""
    fig.suptitle(f"{prefix}{maps.name}: {what}, sample {sample}, {when}", fontsize=10)
    fig.colorbar(im, ax=list(axes[: len(sel)]), shrink=0.8)
    return fig


def _check_report(report) -> EnergyReport:
    if not isinstance(report, EnergyReport):
        raise TypeError(
            f"report: expected an EnergyReport (evformer.models.energy_report), got "
            f"{type(report).__name__}"
        )
    if not report.layers:
        raise ValueError("report: it holds no layer")
    return report


def energy_table(report: EnergyReport, *, total: bool = True) -> list[dict[str, Any]]:
    """The report as plain rows, one per synaptic layer (plus a ``"total"`` row when
    ``total``), per sample: ``layer``, ``kind``, ``rate`` (mean input value per element and
    step), ``dense_macs`` (what the layer would cost dense), ``sops`` (accumulates on
    spikes), ``mac_ops`` (multiply-accumulates on real values), ``energy_ac_uj`` (``sops x
    E_AC``), ``energy_mac_uj`` (``mac_ops x E_MAC``) and ``energy_uj``, in µJ with the
    report's constants (0.9 / 4.6 pJ by default). The total row has ``rate`` None."""
    rep = _check_report(report)
    rows = [
        {
            "layer": r.name,
            "kind": r.kind,
            "rate": r.rate,
            "dense_macs": r.macs,
            "sops": r.sops,
            "mac_ops": r.mac_ops,
            "energy_ac_uj": r.sops * rep.e_ac_pj * 1e-6,
            "energy_mac_uj": r.mac_ops * rep.e_mac_pj * 1e-6,
            "energy_uj": r.energy_mj * 1e3,
        }
        for r in rep.layers
    ]
    if total:
        rows.append(
            {
                "layer": "total",
                "kind": "",
                "rate": None,
                "dense_macs": rep.total_dense_macs,
                "sops": rep.total_sops,
                "mac_ops": rep.total_mac_ops,
                "energy_ac_uj": rep.energy_sop_mj * 1e3,
                "energy_mac_uj": rep.energy_mac_mj * 1e3,
                "energy_uj": rep.energy_mj * 1e3,
            }
        )
    return rows


def energy_figure(report: EnergyReport) -> Figure:
    """Energy per layer and sample (µJ) from :func:`evformer.models.energy_report`, as
    stacked horizontal bars: accumulates on spikes (``SOPs x E_AC``, first bar container)
    and multiply-accumulates on real values (``MAC ops x E_MAC``, second), layers top to
    bottom in forward order; the right panel is each layer's input rate (mean input value
    per element and step, the factor between dense MACs and SOPs)."""
    rows = energy_table(report, total=False)
    L = len(rows)
    y = np.arange(L)
    ac = np.array([r["energy_ac_uj"] for r in rows])
    mac = np.array([r["energy_mac_uj"] for r in rows])
    fig = Figure(figsize=(10.0, 0.24 * L + 1.8), layout="constrained")
    ax, ax_rate = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [2.4, 1]})
    ax.barh(y, ac, color="tab:blue", label=f"AC on spikes ({report.e_ac_pj} pJ / SOP)")
    ax.barh(y, mac, left=ac, color="tab:orange", label=f"MAC on real values ({report.e_mac_pj} pJ)")
    top = float(np.nanmax(ac + mac)) if L else 0.0
    ax.set_xlim(0.0, 1.05 * top if top > 0 else 1.0)
    ax.set_yticks(y, [r["layer"] for r in rows], fontsize=7)
    ax.set_ylim(L - 0.5, -0.5)
    ax.set_xlabel("energy per sample (µJ)")
    ax.set_title(
        f"{report.energy_mj * 1e3:.3g} µJ per sample: {report.total_sops / 1e6:.3g} M SOPs, "
        f"{report.total_mac_ops / 1e6:.3g} M MACs",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    rates = np.array([r["rate"] for r in rows], dtype=np.float64)
    ax_rate.barh(y, rates, color="0.5")
    ax_rate.set_xlabel("input rate (mean input per element and step)", fontsize=8)
    ax_rate.grid(axis="x", alpha=0.3)
    return fig
