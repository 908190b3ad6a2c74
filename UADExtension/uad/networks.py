"""Networks built from a plain config dict (the model manifest stores these dicts).

MONAI's generative networks: ``DiffusionModelUNet`` (denoisers, restorers,
class-conditional UNets; ``include_fc=False`` for GenerativeModels checkpoints whose
attention output projection was never applied) and ``DiffusionModelEncoder`` (the
noise-aware classifier of Wolleb et al.); plus ``GuidedEncoderUNet``
(``uad.guided_diffusion``), the layout of Wolleb et al.'s published classifier.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

_UNET_KEYS = {
    "spatial_dims", "in_channels", "out_channels", "channels", "attention_levels", "num_res_blocks",
    "num_head_channels", "norm_num_groups", "norm_eps", "resblock_updown", "with_conditioning",
    "num_class_embeds", "dropout_cattn", "include_fc", "use_combined_linear", "use_flash_attention",
    "upcast_attention", "transformer_num_layers", "cross_attention_dim",
}


def tiny_unet_config(channels=(16, 32, 32), attention=(False, False, True), **extra) -> dict:
    """A small UNet config for tests and CPU-trained bundled models."""
    cfg = {
        "type": "DiffusionModelUNet",
        "spatial_dims": 2,
        "in_channels": 1,
        "out_channels": 1,
        "channels": list(channels),
        "attention_levels": list(attention),
        "num_res_blocks": 1,
        "num_head_channels": int(channels[-1]),
        "norm_num_groups": min(8, int(channels[0])),
    }
    cfg.update(extra)
    return cfg


def small_unet_config(**extra) -> dict:
    """The CPU-trainable UNet of the bundled models (16-32-64 channels, attention at the deepest level)."""
    return tiny_unet_config((16, 32, 64), (False, False, True), **extra)


def paper_unet_config() -> dict:
    """THOR / AutoDDPM reference UNet (128-256-256, attention at the two deepest levels)."""
    return {
        "type": "DiffusionModelUNet",
        "spatial_dims": 2,
        "in_channels": 1,
        "out_channels": 1,
        "channels": [128, 256, 256],
        "attention_levels": [False, True, True],
        "num_res_blocks": 1,
        "num_head_channels": 256,
    }


def build_network(config: dict) -> nn.Module:
    """Instantiate a network from its config dict (see ``tiny_unet_config``)."""
    cfg = copy.deepcopy(dict(config))
    kind = cfg.pop("type", "DiffusionModelUNet")
    if kind == "DiffusionModelUNet":
        from monai.networks.nets import DiffusionModelUNet

        kwargs = {k: v for k, v in cfg.items() if k in _UNET_KEYS}
        for k in ("channels", "attention_levels"):
            if k in kwargs:
                kwargs[k] = tuple(kwargs[k])
        if isinstance(kwargs.get("num_res_blocks"), list):
            kwargs["num_res_blocks"] = tuple(kwargs["num_res_blocks"])
        return DiffusionModelUNet(**kwargs)
    if kind == "DiffusionModelEncoder":
        from monai.networks.nets.diffusion_model_unet import DiffusionModelEncoder

        kwargs = {k: v for k, v in cfg.items() if k in _UNET_KEYS | {"input_shape"}}
        if isinstance(kwargs.get("input_shape"), list):
            kwargs["input_shape"] = tuple(kwargs["input_shape"])
        for k in ("channels", "attention_levels", "num_res_blocks"):
            if isinstance(kwargs.get(k), list):
                kwargs[k] = tuple(kwargs[k])
        return DiffusionModelEncoder(**kwargs)
    if kind == "GuidedEncoderUNet":  # Wolleb et al.'s published classifier (uad.guided_diffusion)
        from .guided_diffusion import build_guided_encoder

        return build_guided_encoder(dict(config))
    raise ValueError(f"unknown network type {kind!r}")


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def call_unet(net: nn.Module, x: torch.Tensor, t, class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Run a DiffusionModelUNet at timestep(s) t (int or LongTensor (B,))."""
    if not isinstance(t, torch.Tensor):
        t = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
    elif t.ndim == 0:
        t = t.expand(x.shape[0])
    if class_labels is not None:
        return net(x, timesteps=t, class_labels=class_labels)
    return net(x, timesteps=t)
