"""evformer.models (names are imported lazily on first use; see _LAZY)."""

from __future__ import annotations

from evformer._lazy import lazy_exports

# public name -> submodule of evformer.models that defines it
_LAZY: dict[str, str] = {
    # neurons and surrogates
    "LIFNode": "neurons",
    "LIFParams": "neurons",
    "lif_reference": "neurons",
    "reset_net": "neurons",
    "step_states": "neurons",
    "Sigmoid": "surrogate",
    "ATan": "surrogate",
    "get_surrogate": "surrogate",
    "available_backends": "neurons",
    # layers
    "ConvBNLIF": "layers",
    "LinearBNLIF": "layers",
    "SPS": "layers",
    "SCS": "layers",
    "SpikingSelfAttention": "layers",
    "MLP": "layers",
    "EncoderBlock": "layers",
    # models and registry
    "Spikformer": "spikformer",
    "SpikformerV2": "spikformer",
    "SpikformerConfig": "spikformer",
    "SpikformerV2Config": "spikformer",
    "create_model": "registry",
    "list_models": "registry",
    "model_config": "registry",
    "register_model": "registry",
    "PAPER_PARAMS": "registry",
    # masked-autoencoder pretraining
    "SpikformerMAE": "mae",
    "SpikformerMAEConfig": "mae",
    "MAEDecoder": "mae",
    "Masking": "mae",
    "random_masking": "mae",
    "upsample_mask": "mae",
    "patchify": "mae",
    "unpatchify": "mae",
    "sincos_pos_embed_2d": "mae",
    "mae_loss": "mae",
    # official checkpoints, energy
    "load_official_checkpoint": "official",
    "convert_official_state_dict": "official",
    "energy_report": "energy",
    "EnergyReport": "energy",
}

__all__ = list(_LAZY)


__getattr__ = lazy_exports(__name__, _LAZY)
