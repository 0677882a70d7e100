"""Masked-pretraining step against the dense step of the same encoder.

``python -m evformer.bench mae [--configs imagenet,dvs] [--batch 8] [--repeat 3]``

One training step = forward, backward, AdamW step, in two modes on the same batch:

* ``masked``: ``mae_spikformer_v2_8_384`` at ``--mask-ratio`` (0.75): the sparse SCS stem
  (BatchNorm and neurons on the visible positions only), the encoder blocks on the visible
  tokens, the 4-layer 256-wide Transformer decoder and the normalised-pixel loss, T = 1;
* ``dense``: the same encoder, ``spikformer_v2_8_384`` at T = 1, on all tokens with its
  classification head and cross-entropy (the supervised step).

Configurations: ``imagenet`` (3x224x224 images, 14x14 tokens) and ``dvs`` (2x128x128 event
frames of Poisson counts, one time step, 8x8 tokens), both with the V2-8-384 encoder.

Method (as ``python -m evformer.bench model``): every (mode, configuration, measurement)
runs in its own fresh subprocess; time is the best of ``--repeat`` steps after a warm-up
step, over ``--rounds`` alternating runs; peak memory is, on CPU, the peak resident set
size during one step minus the resident size just before it (``MALLOC_MMAP_THRESHOLD_`` set
so that freed blocks go back to the OS), on CUDA ``torch.cuda.max_memory_allocated`` above
the allocation before the step. The split runs each part's forward and backward alone (its
input detached, with gradient) and keeps the best of ``--repeat``: the stem (sparse or
dense SCS), the encoder blocks, and the decoder with the loss (masked) or the head with
the cross-entropy (dense); the optimizer step is the rest. A last table says where the
masked step's time goes: the encoder's own ratio (stem + blocks, masked over dense), the
decoder's and the rest's shares of the dense step, and the step ratio the masked step would
have if its encoder took exactly the visible fraction of the dense encoder's time (the
lowest ratio masking alone can give with this decoder).
Targets: masked step <= 0.35x the dense step's time and <= 0.5x its peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from evformer.bench._util import run_worker, step_peak_bytes

CONFIGS = ("imagenet", "dvs")
MODES = ("masked", "dense")
TIME_TARGET, MEMORY_TARGET = 0.35, 0.5


def _data(config: str, batch: int):
    """Input batch, labels, and the model overrides of one configuration."""
    import torch

    g = torch.Generator().manual_seed(0)
    if config == "imagenet":
        x = torch.rand(batch, 3, 224, 224, generator=g)
        classes, kw = 1000, dict(img_size=224, in_channels=3)
    elif config == "dvs":
        x = torch.poisson(torch.full((batch, 1, 2, 128, 128), 0.3), generator=g)
        classes, kw = 10, dict(img_size=128, in_channels=2)
    else:
        raise ValueError(f"unknown configuration {config!r}; choose from {CONFIGS}")
    y = torch.randint(0, classes, (batch,), generator=g)
    return x, y, classes, kw


def _build(mode: str, config: str, batch: int, mask_ratio: float, device: str):
    """(model, full step closure, [(part name, closure of forward + backward)])."""
    import torch
    import torch.nn.functional as F

    from evformer.models import create_model

    torch.manual_seed(0)
    x, y, classes, kw = _data(config, batch)
    x, y = x.to(device), y.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    if mode == "masked":
        model = create_model("mae_spikformer_v2_8_384", mask_ratio=mask_ratio, **kw)
    elif mode == "dense":
        model = create_model("spikformer_v2_8_384", T=1, num_classes=classes, **kw)
    else:
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def step():
        if mode == "masked":
            loss = model(x, generator=gen)[0]
        else:
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
        sync()

    # the split: each part alone, forward + backward, on a detached input
    if mode == "masked":
        x_seq = model.encoder.to_sequence(x)
        masking = model.random_masking(x_seq, gen)
        blocks = model.encoder.blocks

        def stem(_):
            return model.forward_stem(x_seq, masking)

        def head(latent):
            pred = model.forward_decoder(latent, masking)
            return model.forward_loss(x_seq, pred, masking.mask)

        names = ("stem (sparse SCS)", "encoder blocks", "decoder + loss")
    else:
        x_seq = model.to_sequence(x)
        blocks = model.blocks

        def stem(_):
            return model.patch_embed(x_seq)

        def head(tokens):
            return F.cross_entropy(model.forward_head(tokens), y)

        names = ("stem (dense SCS)", "encoder blocks", "head + loss")

    def run_blocks(tokens):
        for blk in blocks:
            tokens = blk(tokens)
        return tokens

    with torch.no_grad():
        inputs = [None, stem(None)]
        inputs.append(run_blocks(inputs[1]))

    def part(fn, inp):
        def run():
            t = None if inp is None else inp.detach().requires_grad_(True)
            out = fn(t)
            out.backward(torch.ones_like(out) if out.dim() else None)
            model.zero_grad(set_to_none=True)
            sync()

        return run

    parts = [(n, part(f, i)) for n, f, i in zip(names, (stem, run_blocks, head), inputs)]
    return model, step, parts


def _worker(mode: str, config: str, args, what: str) -> dict:

    from evformer.bench._util import best_time

    model, step, parts = _build(mode, config, args.batch, args.mask_ratio, args.device)
    step()  # warm-up: kernel compilation, gradients, optimizer state
    out = {"mode": mode, "config": config}
    if what == "time":
        out["time_s"] = best_time(step, repeat=args.repeat)
        out["parts"] = {n: best_time(fn, repeat=args.repeat) for n, fn in parts}
        return out
    out["peak_mb"] = step_peak_bytes(step, args.device) / 2**20
    return out


def _shares(ma: dict, de: dict, mask_ratio: float) -> list[str]:
    """The split of the masked step against the dense step: the encoder's own ratio (stem +
    blocks, masked over dense), the decoder's and the rest's (step minus the parts: optimizer
    step, masking tables) shares of the dense step, and the step ratio the masked step would
    have if its encoder cost exactly the visible fraction of the dense encoder (the decoder
    and the rest as measured): the lowest time ratio masking alone can give."""
    (m_stem, m_blocks, m_dec), (d_stem, d_blocks, _) = ma["parts"].values(), de["parts"].values()
    dense_step = de["time_s"]
    rest = max(0.0, ma["time_s"] - (m_stem + m_blocks + m_dec))
    ideal = (1 - mask_ratio) * (d_stem + d_blocks) + m_dec + rest
    return [
        f"{(m_stem + m_blocks) / (d_stem + d_blocks):.2f}",
        f"{m_dec / dense_step:.2f}",
        f"{rest / dense_step:.2f}",
        f"{ideal / dense_step:.2f}",
    ]


def _run_worker(mode: str, config: str, args, what: str) -> dict:
    extra = [mode, config, what, "--device", args.device, "--repeat", str(args.repeat)]
    extra += ["--batch", str(args.batch), "--mask-ratio", str(args.mask_ratio)]
    return run_worker("evformer.bench.mae", extra, memory=what == "memory", threads=args.threads)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m evformer.bench mae", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma list of imagenet, dvs")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--repeat", type=int, default=3, help="timed steps per run (best is kept)")
    ap.add_argument("--rounds", type=int, default=1, help="timing runs per mode, alternating")
    ap.add_argument("--threads", type=int, default=0, help="threads per worker (0: all cores)")
    ap.add_argument("--worker", nargs=3, metavar=("MODE", "CONFIG", "WHAT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        mode, config, what = args.worker
        print(json.dumps(_worker(mode, config, args, what)))
        return 0
    import torch

    from evformer.bench._util import machine_summary, print_table

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device available", file=sys.stderr)
        return 2
    if args.rounds < 1 or args.repeat < 1 or args.batch < 2:
        print("--rounds and --repeat must be at least 1, --batch at least 2", file=sys.stderr)
        return 2
    configs = [c for c in args.configs.split(",") if c]
    for c in configs:
        if c not in CONFIGS:
            print(f"unknown configuration {c!r}; choose from {CONFIGS}", file=sys.stderr)
            return 2
    print(f"# masked pretraining step vs dense step, {args.device}: {machine_summary()}")
    print(
        f"# torch {torch.__version__}, threads per worker {args.threads or os.cpu_count()}, "
        f"batch {args.batch}, mask ratio {args.mask_ratio}, V2-8-384 encoder, T = 1"
    )
    rows, split, shares, ok = [], [], [], True
    t0 = time.perf_counter()
    for config in configs:
        res = {mode: _run_worker(mode, config, args, "memory") for mode in MODES}
        for _ in range(args.rounds):
            for mode in MODES:
                r = _run_worker(mode, config, args, "time")
                if r["time_s"] < res[mode].get("time_s", float("inf")):
                    res[mode].update(time_s=r["time_s"], parts=r["parts"])
        ma, de = res["masked"], res["dense"]
        rt, rm = ma["time_s"] / de["time_s"], ma["peak_mb"] / de["peak_mb"]
        ok &= rt <= TIME_TARGET and rm <= MEMORY_TARGET
        rows.append(
            [
                config,
                f"{ma['time_s']:.3f}",
                f"{de['time_s']:.3f}",
                f"{rt:.2f} (<= {TIME_TARGET})",
                f"{ma['peak_mb']:.0f}",
                f"{de['peak_mb']:.0f}",
                f"{rm:.2f} (<= {MEMORY_TARGET})",
            ]
        )
        for mode in MODES:
            parts = res[mode]["parts"]
            split.append([config, mode, *(f"{n}: {t:.3f}" for n, t in parts.items())])
        shares.append([config, *_shares(ma, de, args.mask_ratio)])
    print_table(
        [
            "config",
            "masked step (s)",
            "dense step (s)",
            "time ratio",
            "masked peak (MB)",
            "dense peak (MB)",
            "memory ratio",
        ],
        rows,
    )
    print("\n### Forward + backward of each part alone (s, best of --repeat)\n")
    print_table(["config", "mode", "stem", "encoder blocks", "decoder / head"], split)
    print("\n### Where the masked step's time goes (from the split above)\n")
    print_table(
        [
            "config",
            "encoder (stem + blocks) masked / dense",
            "decoder + loss / dense step",
            "masked rest (optimizer, tables) / dense step",
            "ratio if the encoder took exactly the visible fraction",
        ],
        shares,
    )
    print(f"\ntargets {'met' if ok else 'NOT met'}; total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
