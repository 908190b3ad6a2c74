"""OpenAI guided-diffusion checkpoints (Wolleb et al.'s BraTS models) for the zoo.

Two pieces, both written here from the architecture description (no code of the
reference is used):

* ``convert_guided_unet``: the diffusion ``UNetModel`` (class-conditional, learned
  variance, no scale-shift norm, no res-block up/down sampling) maps onto MONAI's
  ``DiffusionModelUNet`` tensor for tensor with a key map of our own
  (``guided_unet_key_map``).  The attention ``qkv`` 1x1 convolution (legacy head
  order: per head [q, k, v]) is split into MONAI's ``to_q / to_k / to_v`` linears and
  ``proj_out`` becomes ``out_proj``.  Only the epsilon half of the 2C output channels
  is kept (the learned-variance half is not used by DDIM sampling).
* ``GuidedEncoderUNet``: the noise-aware classifier (``EncoderUNetModel`` with
  scale-shift norm, res-block down-sampling and attention pooling), implemented with
  the same parameter names and shapes so that its state dict loads as is.

Layout of the reference (``input_blocks.N``, ``middle_block.0..2``,
``output_blocks.N``, ``out``; res blocks ``in_layers.{0,2}``, ``emb_layers.1``,
``out_layers.{0,3}``, ``skip_connection``; attention ``norm``, ``qkv``,
``proj_out``; attention pool ``positional_embedding``, ``qkv_proj``, ``c_proj``).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from . import ModelError

_RES_SUB = {"in_layers.0": "norm1", "in_layers.2": "conv1.conv", "emb_layers.1": "time_emb_proj",
            "out_layers.0": "norm2", "out_layers.3": "conv2.conv", "skip_connection": "skip_connection.conv"}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos, sin] of the (B,) timesteps (the convention of both codebases)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


# ----------------------------------------------------------------------------- diffusion UNet -> MONAI
def _n_blocks(state: dict, prefix: str) -> int:
    idx = {int(m.group(1)) for k in state for m in [re.match(rf"{prefix}\.(\d+)\.", k)] if m}
    return max(idx) + 1 if idx else 0


def infer_guided_unet(state: dict, name: str = "checkpoint", num_heads: int = 1) -> dict:
    """The MONAI ``DiffusionModelUNet`` config of a guided-diffusion ``UNetModel`` state dict.

    Read from the tensors: input / output channels, channels per level, res blocks per level,
    attention levels, number of classes.  ``num_heads`` (not visible in the weights; Wolleb: 1)
    gives ``num_head_channels = channels // num_heads`` per level.
    """
    try:
        w_in = state["input_blocks.0.0.weight"]
        w_out = state["out.2.weight"]
    except KeyError as e:
        raise ModelError(f"{name}: not a guided-diffusion UNetModel (no tensor {e.args[0]})") from None
    n_in = _n_blocks(state, "input_blocks")
    channels, attention, res_counts = [], [], []
    count, ch, attn = 0, None, False
    for n in range(1, n_in):
        if f"input_blocks.{n}.0.op.weight" in state:  # a down-sampling convolution ends the level
            channels.append(ch)
            attention.append(attn)
            res_counts.append(count)
            count, attn = 0, False
            continue
        if f"input_blocks.{n}.0.in_layers.2.weight" not in state:
            raise ModelError(f"{name}: input block {n} is neither a res block nor a down-sampling convolution "
                             f"(res-block up/down sampling is not supported)")
        ch = int(state[f"input_blocks.{n}.0.in_layers.2.weight"].shape[0])
        emb = state.get(f"input_blocks.{n}.0.emb_layers.1.weight")
        if emb is not None and int(emb.shape[0]) == 2 * ch:
            raise ModelError(f"{name}: the UNet uses scale-shift norm, which MONAI's DiffusionModelUNet lacks")
        attn = attn or f"input_blocks.{n}.1.qkv.weight" in state
        count += 1
    channels.append(ch)
    attention.append(attn)
    res_counts.append(count)
    if len(set(res_counts)) != 1 or res_counts[0] < 1:
        raise ModelError(f"{name}: res blocks per level differ or are missing ({res_counts})")
    if any(c % num_heads for c in channels):
        raise ModelError(f"{name}: channels {channels} are not divisible by {num_heads} heads")
    cfg = {"type": "DiffusionModelUNet", "spatial_dims": 2, "in_channels": int(w_in.shape[1]),
           "out_channels": int(w_out.shape[0]), "channels": channels, "attention_levels": attention,
           "num_res_blocks": res_counts[0], "num_head_channels": [c // num_heads for c in channels],
           "norm_num_groups": 32, "norm_eps": 1e-5}
    if "label_emb.weight" in state:
        cfg["num_class_embeds"] = int(state["label_emb.weight"].shape[0])
    return cfg


def guided_unet_key_map(cfg: dict) -> list[tuple[str, str, str]]:
    """(guided prefix, MONAI prefix, kind) for every module; kind: plain | embedding | res | attn."""
    L, R = len(cfg["channels"]), int(cfg["num_res_blocks"])
    att = list(cfg["attention_levels"])
    out = [("time_embed.0", "time_embed.0", "plain"), ("time_embed.2", "time_embed.2", "plain"),
           ("input_blocks.0.0", "conv_in.conv", "plain"), ("out.0", "out.0", "plain"),
           ("out.2", "out.2.conv", "plain")]
    if cfg.get("num_class_embeds"):
        out.append(("label_emb", "class_embedding", "embedding"))
    n = 1
    for lvl in range(L):
        for r in range(R):
            out.append((f"input_blocks.{n}.0", f"down_blocks.{lvl}.resnets.{r}", "res"))
            if att[lvl]:
                out.append((f"input_blocks.{n}.1", f"down_blocks.{lvl}.attentions.{r}", "attn"))
            n += 1
        if lvl != L - 1:
            out.append((f"input_blocks.{n}.0.op", f"down_blocks.{lvl}.downsampler.op.conv", "plain"))
            n += 1
    out += [("middle_block.0", "middle_block.resnet_1", "res"), ("middle_block.1", "middle_block.attention", "attn"),
            ("middle_block.2", "middle_block.resnet_2", "res")]
    m = 0
    for u, lvl in enumerate(reversed(range(L))):
        for r in range(R + 1):
            out.append((f"output_blocks.{m}.0", f"up_blocks.{u}.resnets.{r}", "res"))
            k = 1
            if att[lvl]:
                out.append((f"output_blocks.{m}.1", f"up_blocks.{u}.attentions.{r}", "attn"))
                k = 2
            if lvl != 0 and r == R:
                out.append((f"output_blocks.{m}.{k}.conv", f"up_blocks.{u}.upsampler.postconv.conv", "plain"))
            m += 1
    return out


def guided_to_monai_state(state: dict, cfg: dict, num_heads: int = 1, name: str = "checkpoint") -> dict:
    """MONAI tensors from a guided-diffusion UNet state dict; missing / unexpected tensors are named."""
    new, used = {}, set()

    def take(key):
        if key in state:
            used.add(key)
            return state[key]
        return None

    missing = []
    for g, m, kind in guided_unet_key_map(cfg):
        if kind in ("plain", "embedding"):
            for s in (("weight",) if kind == "embedding" else ("weight", "bias")):
                v = take(f"{g}.{s}")
                if v is None:
                    missing.append(f"{g}.{s}")
                else:
                    new[f"{m}.{s}"] = v
        elif kind == "res":
            for gs, ms in _RES_SUB.items():
                for s in ("weight", "bias"):
                    v = take(f"{g}.{gs}.{s}")
                    if v is not None:
                        new[f"{m}.{ms}.{s}"] = v
                    elif gs != "skip_connection":
                        missing.append(f"{g}.{gs}.{s}")
        elif kind == "attn":
            for s in ("weight", "bias"):
                nv = take(f"{g}.norm.{s}")
                qkv = take(f"{g}.qkv.{s}")
                po = take(f"{g}.proj_out.{s}")
                for key, v in ((f"{g}.norm.{s}", nv), (f"{g}.qkv.{s}", qkv), (f"{g}.proj_out.{s}", po)):
                    if v is None:
                        missing.append(key)
                if nv is None or qkv is None or po is None:
                    continue
                new[f"{m}.norm.{s}"] = nv
                c = qkv.shape[0] // 3
                per = qkv.reshape(num_heads, 3, c // num_heads, *qkv.shape[1:])  # legacy order: per head q, k, v
                for j, part in enumerate(("to_q", "to_k", "to_v")):
                    t = per[:, j].reshape(c, *qkv.shape[1:])
                    new[f"{m}.attn.{part}.{s}"] = t[..., 0] if t.ndim == 3 else t
                new[f"{m}.attn.out_proj.{s}"] = po[..., 0] if po.ndim == 3 else po
    unexpected = sorted(set(state) - used)
    if missing or unexpected:
        from .reference import key_mismatch

        raise ModelError(f"{name}: the state dict does not match the guided-diffusion UNetModel read from it: "
                         + key_mismatch(missing, unexpected))
    return new


def convert_guided_unet(state: dict, name: str = "checkpoint", num_heads: int = 1,
                        keep_eps_only: bool = True) -> tuple[nn.Module, dict]:
    """(MONAI DiffusionModelUNet, its config) holding a guided-diffusion UNet's weights.

    With learned variance (out channels = 2 x in channels) only the epsilon half is kept.
    """
    from .networks import build_network

    cfg = infer_guided_unet(state, name, num_heads)
    new = guided_to_monai_state(state, cfg, num_heads, name)
    if keep_eps_only and cfg["out_channels"] == 2 * cfg["in_channels"]:
        c = cfg["in_channels"]
        new["out.2.conv.weight"] = new["out.2.conv.weight"][:c]
        new["out.2.conv.bias"] = new["out.2.conv.bias"][:c]
        cfg = dict(cfg, out_channels=c, learned_variance_dropped=True)
    net = build_network(cfg)
    ref = net.state_dict()
    bad = [f"{k} {tuple(new[k].shape)} (expected {tuple(v.shape)})" for k, v in ref.items()
           if k in new and tuple(new[k].shape) != tuple(v.shape)]
    if bad:
        raise ModelError(f"{name}: tensors of another shape: {', '.join(bad[:6])}")
    missing, unexpected = net.load_state_dict(new, strict=False)
    if missing or unexpected:
        raise ModelError(f"{name}: mapping incomplete (MONAI tensors without a source: {', '.join(missing[:8])}; "
                         f"unused: {', '.join(unexpected[:8])})")
    return net.eval(), cfg


# ----------------------------------------------------------------------------- classifier
class _Norm(nn.GroupNorm):
    """GroupNorm(32) evaluated in float32."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


class _ResBlock(nn.Module):
    def __init__(self, ch: int, emb_dim: int, out_ch: int, scale_shift: bool, down: bool = False):
        super().__init__()
        self.scale_shift, self.down = scale_shift, down
        self.in_layers = nn.Sequential(_Norm(ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_ch if scale_shift else out_ch))
        self.out_layers = nn.Sequential(_Norm(out_ch), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip_connection = nn.Identity() if out_ch == ch else nn.Conv2d(ch, out_ch, 1)

    def forward(self, x, emb):
        if self.down:  # normalise + activate, then halve both paths, then convolve
            h = self.in_layers[1](self.in_layers[0](x))
            h = F.avg_pool2d(h, 2)
            x = F.avg_pool2d(x, 2)
            h = self.in_layers[2](h)
        else:
            h = self.in_layers(x)
        e = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            for layer in self.out_layers[1:]:
                h = layer(h)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


def _attend(q, k, v):
    """Softmax attention over (N, c, T) queries, keys and values -> (N, c, T)."""
    w = torch.einsum("nct,ncs->nts", q, k) / math.sqrt(q.shape[1])
    w = torch.softmax(w.float(), dim=-1).type(q.dtype)
    return torch.einsum("nts,ncs->nct", w, v)


class _Attention(nn.Module):
    """Self-attention over the pixels; qkv in the legacy layout (per head: q, k, v)."""

    def __init__(self, ch: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = _Norm(ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv1d(ch, ch, 1)

    def forward(self, x, emb=None):
        b, c = x.shape[:2]
        flat = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(flat)).reshape(b * self.heads, 3 * c // self.heads, -1)
        q, k, v = qkv.split(c // self.heads, dim=1)
        h = _attend(q, k, v).reshape(b, c, -1)
        return (flat + self.proj_out(h)).reshape(x.shape)


class _AttentionPool(nn.Module):
    """Attention pooling: the mean token (plus positions) attends to every pixel token."""

    def __init__(self, side: int, ch: int, head_channels: int, out_ch: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(ch, side * side + 1) / ch ** 0.5)
        self.qkv_proj = nn.Conv1d(ch, 3 * ch, 1)
        self.c_proj = nn.Conv1d(ch, out_ch, 1)
        self.heads = ch // head_channels

    def forward(self, x):
        b, c = x.shape[:2]
        t = x.reshape(b, c, -1)
        t = torch.cat([t.mean(dim=-1, keepdim=True), t], dim=-1) + self.positional_embedding[None].to(t.dtype)
        q, k, v = self.qkv_proj(t).chunk(3, dim=1)  # new order: all heads' q, then k, then v
        n = t.shape[-1]
        h = _attend(q.reshape(b * self.heads, -1, n), k.reshape(b * self.heads, -1, n),
                    v.reshape(b * self.heads, -1, n)).reshape(b, c, n)
        return self.c_proj(h)[:, :, 0]


class _Seq(nn.ModuleList):
    def forward(self, x, emb):
        for m in self:
            x = m(x, emb) if isinstance(m, (_ResBlock, _Attention)) else m(x)
        return x


class GuidedEncoderUNet(nn.Module):
    """The noise-aware classifier of Wolleb et al. (guided-diffusion's ``EncoderUNetModel``,
    attention pooling), with the reference's parameter names.  ``forward(x, timesteps)`` -> logits.

    ``attention_resolutions`` are down-sampling factors (image_size // resolution), as in
    guided-diffusion's ``create_classifier``.
    """

    def __init__(self, image_size: int = 256, in_channels: int = 4, model_channels: int = 32,
                 out_channels: int = 2, num_res_blocks: int = 4, attention_resolutions=(8, 16, 32),
                 channel_mult=(1, 1, 2, 2, 4, 4), num_head_channels: int = 64, use_scale_shift_norm: bool = True,
                 resblock_updown: bool = True, pool: str = "attention"):
        super().__init__()
        if pool != "attention":
            raise ValueError(f"GuidedEncoderUNet: only attention pooling is implemented, got {pool!r}")
        if not resblock_updown:
            raise ValueError("GuidedEncoderUNet: only res-block down-sampling (resblock_updown) is implemented")
        self.model_channels = model_channels
        emb = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([_Seq([nn.Conv2d(in_channels, ch, 3, padding=1)])])
        ds = 1
        att = {int(a) for a in attention_resolutions}
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [_ResBlock(ch, emb, int(mult * model_channels), use_scale_shift_norm)]
                ch = int(mult * model_channels)
                if ds in att:
                    layers.append(_Attention(ch, ch // num_head_channels))
                self.input_blocks.append(_Seq(layers))
            if level != len(channel_mult) - 1:
                self.input_blocks.append(_Seq([_ResBlock(ch, emb, ch, use_scale_shift_norm, down=True)]))
                ds *= 2
        self.middle_block = _Seq([_ResBlock(ch, emb, ch, use_scale_shift_norm),
                                  _Attention(ch, ch // num_head_channels),
                                  _ResBlock(ch, emb, ch, use_scale_shift_norm)])
        self.out = nn.Sequential(_Norm(ch), nn.SiLU(), _AttentionPool(image_size // ds, ch, num_head_channels,
                                                                       out_channels))

    def forward(self, x, timesteps=None, **_):
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
        h = self.middle_block(h, emb)
        return self.out(h)


WOLLEB_CLASSIFIER = {"type": "GuidedEncoderUNet", "image_size": 256, "in_channels": 4, "model_channels": 32,
                     "out_channels": 2, "num_res_blocks": 4, "attention_resolutions": [8, 16, 32],
                     "channel_mult": [1, 1, 2, 2, 4, 4], "num_head_channels": 64, "use_scale_shift_norm": True,
                     "resblock_updown": True, "pool": "attention"}


def infer_guided_classifier(state: dict, name: str = "checkpoint", base: dict | None = None) -> dict:
    """The classifier config: Wolleb's flags, with input / output / width / image size read from the tensors."""
    cfg = dict(base or WOLLEB_CLASSIFIER)
    try:
        w_in = state["input_blocks.0.0.weight"]
        c_proj = state["out.2.c_proj.weight"]
        pos = state["out.2.positional_embedding"]
    except KeyError as e:
        raise ModelError(f"{name}: not a guided-diffusion EncoderUNetModel with attention pooling "
                         f"(no tensor {e.args[0]})") from None
    cfg["in_channels"] = int(w_in.shape[1])
    cfg["model_channels"] = int(w_in.shape[0] / cfg["channel_mult"][0])
    cfg["out_channels"] = int(c_proj.shape[0])
    side = int(round((pos.shape[1] - 1) ** 0.5))
    cfg["image_size"] = side * 2 ** (len(cfg["channel_mult"]) - 1)
    return cfg


def load_guided_classifier(state: dict, name: str = "checkpoint", base: dict | None = None) -> tuple[nn.Module, dict]:
    cfg = infer_guided_classifier(state, name, base)
    net = build_guided_encoder(cfg)
    ref = net.state_dict()
    missing = sorted(set(ref) - set(state))
    unexpected = sorted(set(state) - set(ref))
    if missing or unexpected:
        from .reference import key_mismatch

        raise ModelError(f"{name}: the classifier state dict does not match the EncoderUNetModel of config "
                         f"{ {k: v for k, v in cfg.items() if k != 'type'} }: " + key_mismatch(missing, unexpected))
    bad = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in ref.items()
           if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        raise ModelError(f"{name}: classifier tensors of another shape: {', '.join(bad[:6])}")
    net.load_state_dict(state)
    return net.eval(), cfg


def build_guided_encoder(cfg: dict) -> GuidedEncoderUNet:
    kw = {k: v for k, v in cfg.items() if k != "type"}
    for k in ("attention_resolutions", "channel_mult"):
        if k in kw:
            kw[k] = tuple(kw[k])
    return GuidedEncoderUNet(**kw)
