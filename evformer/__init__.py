"""evformer: event-camera datasets and spiking vision transformers."""

__version__ = "0.1.0"
