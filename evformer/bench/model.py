"""Training-step time and peak memory: evformer's Spikformer against spikingjelly 2.0.

``python -m evformer.bench model [--device cpu|cuda] [--configs cifar,dvs] [--repeat 3]``

Configurations (one training step = forward + backward + AdamW step, cross-entropy on the
time-averaged logits):

* ``cifar``: CIFAR10 Spikformer 4-384, T=4, batch 8, 32x32 images -- evformer
  ``spikformer_cifar_4_384`` against spikingjelly's ``spikformer_cifar10``;
* ``dvs``: CIFAR10-DVS Spikformer 2-256 (16 heads), T=16, batch 2, 2x128x128 event frames --
  evformer ``spikformer_cifar10dvs_2_256`` against the same architecture built from
  spikingjelly's ``Spikformer`` class.

Method. Every (library, configuration, measurement) runs in its own fresh subprocess, so
neither library sees the other's allocations or warm caches. Time: the best of ``--repeat``
steps after a warm-up step (which also compiles kernels and allocates gradients and
optimizer state), default allocator settings, over ``--rounds`` runs per library that
alternate between the libraries (a shared machine's speed drifts over minutes; alternating
exposes both libraries to it alike). Peak memory, in a separate process: on CPU
the peak resident set size during one step minus the resident size just before it (Linux
``VmHWM`` reset through ``/proc/self/clear_refs``), with glibc told to return large blocks
to the OS at once (``MALLOC_MMAP_THRESHOLD_=65536``) so the figure is what the step itself
needs; on CUDA ``torch.cuda.max_memory_allocated`` minus the allocation before the step.
``--threads`` sets torch's and Numba's thread count in the workers (default: all cores); the
environment is passed on, so e.g. ``OMP_WAIT_POLICY=PASSIVE`` (torch's OpenMP threads sleep
instead of spinning between ops, which frees the cores for evformer's Numba kernels and
helps on a busy machine) applies to both libraries alike.
evformer's CPU kernels run on torch's own OpenMP threads; ``EVFORMER_OMP_TEAM=0`` in the
environment times them as Numba ``prange`` loops instead (same results).
evformer computes a conv/linear unit's forward product and weight gradient event-driven
when at most ``EVFORMER_SPARSE_DENSITY`` (default 0.12) of its inputs are non-zero spikes
(per call, from the actual input: in these random-input CIFAR steps SPS convs 2-3, the
attention projections and the second MLP layers, whose inputs are 1.5-7 % non-zero; SPS
conv 4, the RPE conv, q/k/v and the first MLP layers see 17-26 %);
``EVFORMER_SPARSE_DENSITY=0`` times every product dense (oneDNN) instead.
Targets: step time <= 0.8x and peak memory <= 0.6x spikingjelly's.

``--breakdown`` adds, per library, one step under the torch profiler split into the dense
products (convolutions, their backward, matrix products), evformer's event-driven products,
and everything else (normalisation, neurons, attention glue, optimizer, framework). The
profiler adds overhead, so these seconds exceed the timed step; the split is what they show.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from evformer.bench._util import run_worker, step_peak_bytes

CONFIGS = ("cifar", "dvs")
LIBS = ("evformer", "spikingjelly")
TIME_TARGET, MEMORY_TARGET = 0.8, 0.6


def _build(lib: str, config: str, device: str):
    """Model, input batch, labels and a step closure for one (library, configuration)."""
    import torch

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if config == "cifar":
        T, B, C, H, classes = 4, 8, 3, 32, 10
        x = torch.rand(B, C, H, H, generator=g)
    elif config == "dvs":
        T, B, C, H, classes = 16, 2, 2, 128, 10
        x = torch.poisson(torch.full((B, T, C, H, H), 0.3), generator=g)
    else:
        raise ValueError(f"unknown configuration {config!r}; choose from {CONFIGS}")
    y = torch.randint(0, classes, (B,), generator=g)
    reset = None
    if lib == "evformer":
        from evformer.models import create_model

        name = "spikformer_cifar_4_384" if config == "cifar" else "spikformer_cifar10dvs_2_256"
        model = create_model(name)

        def forward(inp):
            return model(inp)

    elif lib == "spikingjelly":
        from spikingjelly.activation_based import functional
        from spikingjelly.activation_based.model.spikformer import Spikformer, spikformer_cifar10

        if config == "cifar":
            model = spikformer_cifar10(T=T)
        else:
            model = Spikformer(
                T=T,
                in_channels=2,
                img_size_h=128,
                img_size_w=128,
                patch_size=16,
                num_classes=classes,
                embed_dims=256,
                num_heads=16,
                depths=2,
            )
            x = x.transpose(0, 1).contiguous()  # spikingjelly takes [T, B, C, H, W]

        def forward(inp):
            return model(inp).mean(0)  # [T, B, classes] -> time average

        def reset():
            functional.reset_net(model)

    else:
        raise ValueError(f"unknown library {lib!r}; choose from {LIBS}")
    model = model.to(device).train()
    x, y = x.to(device), y.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        if reset is not None:
            reset()
        loss = torch.nn.functional.cross_entropy(forward(x), y)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return model, step


#: profiler op names of the dense products (convolution and matrix-multiply kernels)
DENSE_OPS = frozenset(
    {
        "aten::mkldnn_convolution",
        "aten::convolution_backward",
        "aten::cudnn_convolution",
        "aten::mm",
        "aten::bmm",
        "aten::addmm",
        "aten::baddbmm",
    }
)


#: profiler ranges of evformer's event-driven (spike-sparse) products
SPARSE_OPS = frozenset({"evformer::sparse_conv_forward", "evformer::sparse_conv_weight_grad"})


def _breakdown(step) -> dict:
    """Seconds of one profiled step: total self time, the dense products' and the
    event-driven products' shares."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    dense = sum(e.self_cpu_time_total for e in events if e.key in DENSE_OPS) / 1e6
    sparse = sum(e.self_cpu_time_total for e in events if e.key in SPARSE_OPS) / 1e6
    return {"profiled_s": total, "dense_s": dense, "sparse_s": sparse}


def _worker(lib: str, config: str, device: str, repeat: int, what: str) -> dict:

    from evformer.bench._util import best_time

    model, step = _build(lib, config, device)
    step()  # warm-up: kernel compilation, gradients, optimizer state
    params = sum(p.numel() for p in model.parameters())
    if what == "time":
        t = best_time(step, repeat=repeat)
        return {"lib": lib, "config": config, "time_s": t, "params": params}
    if what == "breakdown":
        return {"lib": lib, "config": config, **_breakdown(step)}
    peak = step_peak_bytes(step, device)
    return {"lib": lib, "config": config, "peak_mb": peak / 2**20, "params": params}


def _run_worker(lib: str, config: str, args, what: str) -> dict:
    extra = [lib, config, what, "--device", args.device, "--repeat", str(args.repeat)]
    return run_worker("evformer.bench.model", extra, memory=what == "memory", threads=args.threads)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m evformer.bench model", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma list of cifar, dvs")
    ap.add_argument("--repeat", type=int, default=3, help="timed steps per run (best is kept)")
    ap.add_argument(
        "--rounds", type=int, default=2, help="timing runs per library, alternating (best kept)"
    )
    ap.add_argument("--threads", type=int, default=0, help="threads per worker (0: all cores)")
    ap.add_argument(
        "--breakdown", action="store_true", help="split a profiled step: dense products / rest"
    )
    ap.add_argument("--worker", nargs=3, metavar=("LIB", "CONFIG", "WHAT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        lib, config, what = args.worker
        print(json.dumps(_worker(lib, config, args.device, args.repeat, what)))
        return 0
    import torch

    from evformer.bench._util import machine_summary, print_table

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device available", file=sys.stderr)
        return 2
    if args.rounds < 1 or args.repeat < 1:
        print("--rounds and --repeat must be at least 1", file=sys.stderr)
        return 2
    configs = [c for c in args.configs.split(",") if c]
    for c in configs:
        if c not in CONFIGS:
            print(f"unknown configuration {c!r}; choose from {CONFIGS}", file=sys.stderr)
            return 2
    print(f"# Spikformer training step, {args.device}: {machine_summary()}")
    if args.device == "cuda":
        print(f"# GPU: {torch.cuda.get_device_name()}")
    print(f"# torch {torch.__version__}, threads per worker {args.threads or os.cpu_count()}")
    rows, ok, split = [], True, []
    t0 = time.perf_counter()
    for config in configs:
        # time workers alternate between the libraries, ``--rounds`` times, and each keeps
        # its best: drift of a shared machine over minutes then hits both alike
        res = {lib: _run_worker(lib, config, args, "memory") for lib in LIBS}
        for _ in range(args.rounds):
            for lib in LIBS:
                t = _run_worker(lib, config, args, "time")
                res[lib]["time_s"] = min(res[lib].get("time_s", float("inf")), t["time_s"])
        if args.breakdown and args.device == "cpu":
            for lib in LIBS:
                b = _run_worker(lib, config, args, "breakdown")
                rest = b["profiled_s"] - b["dense_s"] - b["sparse_s"]
                times = (b["profiled_s"], b["dense_s"], b["sparse_s"], rest)
                split.append([config, lib, *(f"{x:.3f}" for x in times)])
        ev, sj = res["evformer"], res["spikingjelly"]
        rt, rm = ev["time_s"] / sj["time_s"], ev["peak_mb"] / sj["peak_mb"]
        ok &= rt <= TIME_TARGET and rm <= MEMORY_TARGET
        rows.append(
            [
                config,
                f"{ev['time_s']:.3f}",
                f"{sj['time_s']:.3f}",
                f"{rt:.2f} (<= {TIME_TARGET})",
                f"{ev['peak_mb']:.0f}",
                f"{sj['peak_mb']:.0f}",
                f"{rm:.2f} (<= {MEMORY_TARGET})",
            ]
        )
    print_table(
        [
            "config",
            "evformer step (s)",
            "spikingjelly step (s)",
            "time ratio",
            "evformer peak (MB)",
            "spikingjelly peak (MB)",
            "memory ratio",
        ],
        rows,
    )
    if split:
        print("\n### One profiled step (CPU self time, s)\n")
        head = ["config", "library", "profiled step", "dense products", "event-driven", "rest"]
        print_table(head, split)
    print(f"\ntargets {'met' if ok else 'NOT met'}; total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
