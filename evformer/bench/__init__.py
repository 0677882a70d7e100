"""Benchmarks users can run: ``python -m evformer.bench <name> [options]``.

Each benchmark measures evformer and its competitors in the same run and prints
ratios. Benchmarks never run inside the test suite's timing assertions.
"""

BENCHMARKS = {
    "binning": "event-to-frame binning against tonic and spikingjelly",
    "readers": "AEDAT 3.1 / 2.0 parsing against tonic and spikingjelly",
    "dataset": "dataset preparation and loading against spikingjelly and tonic",
    "model": "Spikformer training step time and memory against spikingjelly",
    "mae": "masked-pretraining step time and memory against the dense step",
}
