"""Importing Wolleb et al.'s guided-diffusion checkpoints (``uad.guided_diffusion``, ``uad.reference.import_wolleb``).

The reference networks are OpenAI guided-diffusion's ``UNetModel`` and ``EncoderUNetModel``
as packaged on PyPI by ``guided-diffusion-sdk`` (module ``guided_diffusion``; its ``unet.py``
matches the one in JuliaWolleb/diffusion-anomaly up to that repository's debugging edits of
the classifier's unused pooling variants).  It is not a dependency of the project (it pulls
``blobfile``), so these tests skip when it is absent; to run them:
``pip download --no-deps guided-diffusion-sdk==1.0.0`` and put the unpacked folder on
``PYTHONPATH``.  Our key map and our classifier implementation are written independently of it.
"""

from __future__ import annotations

import pytest
import torch

import uad.zoo as zoo
from uad.cli import main

gd = pytest.importorskip("guided_diffusion.unet")

UNET = dict(image_size=64, in_channels=4, model_channels=32, out_channels=8, num_res_blocks=1,
            attention_resolutions=(4,), dropout=0, channel_mult=(1, 2, 2), num_classes=2,
            use_scale_shift_norm=False, resblock_updown=False)
# the released classifier flags (width 32, depth 4, attention at 32/16/8 px of 256, 64 head channels), at 64 px
CLASSIFIER = dict(image_size=64, in_channels=4, model_channels=32, out_channels=2, num_res_blocks=4,
                  attention_resolutions=(8, 16, 32), channel_mult=(1, 1, 2, 2, 4, 4), num_head_channels=64,
                  use_scale_shift_norm=True, resblock_updown=True, pool="attention")




def _randomise(net, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():  # the reference zero-initialises output layers: randomise everything
        for mod in net.modules():
            for name, p in mod.named_parameters(recurse=False):
                if isinstance(mod, torch.nn.GroupNorm) and name == "weight":
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                elif p.ndim > 1:
                    p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
                else:
                    p.copy_(0.05 * torch.randn_like(p))
    return net.eval()


@pytest.mark.parametrize("heads", [1, 2])
def test_guided_unet_maps_onto_monai(heads):
    from uad.guided_diffusion import convert_guided_unet

    ref = _randomise(gd.UNetModel(num_heads=heads, **UNET), seed=heads)
    net, cfg = convert_guided_unet(ref.state_dict(), num_heads=heads)
    assert cfg["channels"] == [32, 64, 64] and cfg["attention_levels"] == [False, False, True]
    assert cfg["out_channels"] == 4 and cfg["num_class_embeds"] == 2 and cfg["num_head_channels"][-1] == 64 // heads
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 64, 64, generator=g)
    t, y = torch.tensor([0, 300, 999]), torch.tensor([0, 1, 0])
    with torch.no_grad():
        a = ref(x, t, y=y)[:, :4]  # the epsilon half of the learned-variance output
        b = net(x, timesteps=t, class_labels=y)
    assert a.abs().mean() > 0.1
    assert float((a - b).abs().max()) < 1e-5


def test_guided_classifier_has_the_reference_layout():
    from uad.guided_diffusion import load_guided_classifier

    ref = _randomise(gd.EncoderUNetModel(**CLASSIFIER), seed=3)
    net, cfg = load_guided_classifier(ref.state_dict())
    assert cfg["image_size"] == 64 and cfg["model_channels"] == 32 and cfg["in_channels"] == 4
    assert set(net.state_dict()) == set(ref.state_dict())
    x = torch.randn(3, 4, 64, 64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 500, 999])
    with torch.no_grad():
        a, b = ref(x, t), net(x, timesteps=t)
    assert a.abs().mean() > 0.01 and float((a - b).abs().max()) < 1e-5
    # the gradient the guidance uses agrees as well
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ga, = torch.autograd.grad(torch.log_softmax(ref(xa, t), -1)[:, 0].sum(), xa)
    gb, = torch.autograd.grad(torch.log_softmax(net(xb, timesteps=t), -1)[:, 0].sum(), xb)
    assert float((ga - gb).abs().max()) < 1e-5 * max(1.0, float(ga.abs().max()))


class _RefDenoiser(torch.nn.Module):
    """The reference UNet behind our calling convention (epsilon half of its output)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, timesteps=None, class_labels=None):
        return self.net(x, timesteps, y=class_labels)[:, : x.shape[1]]


class _RefClassifier(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, timesteps=None):
        return self.net(x, timesteps)


def test_import_round_trip_and_wolleb_chain_equals_reference(cache, tmp_path, capsys):
    from uad.methods import build_method
    from uad.rng import BatchRNG

    unet = _randomise(gd.UNetModel(num_heads=1, **UNET), seed=5)
    clf = _randomise(gd.EncoderUNetModel(**CLASSIFIER), seed=6)
    dfile, cfile = tmp_path / "brats_diffusion.pt", tmp_path / "brats_classifier.pt"
    torch.save(unet.state_dict(), dfile)
    torch.save({f"module.{k}": v for k, v in clf.state_dict().items()}, cfile)  # DataParallel prefix
    rc = main(["models", "import-reference", "wolleb", str(dfile), "--classifier", str(cfile), "--id", "wb"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "imported wb" in out and "Method API" in out
    assert main(["models", "verify", "wb"]) == 0 and "ok      wb" in capsys.readouterr().out
    e = zoo.find_model("wb")
    d = e.data
    assert d["methods"] == ["wolleb"] and d["image_size"] == 64 and d["intensity_range"] == [0.0, 1.0]
    assert d["channels"] == ["t1", "t1ce", "t2", "flair"] and d["license"] == "MIT"
    assert d["networks"]["classifier"]["type"] == "GuidedEncoderUNet"
    assert d["method_params"]["wolleb"] == {"level": 500, "scale": 100.0}
    assert "MIT" in e.card_path.read_text()

    imported = zoo.load_model("wb")
    reference = zoo.Model("ref", dict(imported.config), {"denoiser": _RefDenoiser(unet), "classifier": _RefClassifier(clf)})
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    disk = ((xx ** 2 + yy ** 2) < 0.7).float()
    x = torch.stack([0.2 + 0.6 * disk * (1 + 0.1 * c) / 1.3 for c in range(4)])[None].repeat(2, 1, 1, 1)
    x[1, :, 20:30, 35:45] = 1.0
    mask = disk.bool().expand(2, 1, 64, 64)
    outs = []
    for model in (imported, reference):
        meth = build_method("wolleb", model, "paper", level=12, steps=3, scale=20.0)
        outs.append(meth(x, mask, BatchRNG.for_slices(0, [0, 1])))
    a, b = outs
    assert a.nfe == b.nfe == 9 and a.extras["classifier_calls"] == 3
    assert a.restoration.shape == (2, 4, 64, 64) and a.anomaly.shape == (2, 1, 64, 64)
    assert float((a.restoration - b.restoration).abs().max()) < 1e-4
    assert float((a.anomaly - b.anomaly).abs().max()) < 1e-4
    assert float(a.anomaly.max()) > 0


def test_classifier_with_wrong_tensors_is_named(cache, tmp_path, capsys):
    unet = _randomise(gd.UNetModel(num_heads=1, **UNET))
    clf = _randomise(gd.EncoderUNetModel(**CLASSIFIER)).state_dict()
    clf.pop("middle_block.1.qkv.weight")
    clf["extra.weight"] = torch.zeros(2)
    dfile, cfile = tmp_path / "d.pt", tmp_path / "c.pt"
    torch.save(unet.state_dict(), dfile)
    torch.save(clf, cfile)
    rc = main(["models", "import-reference", "wolleb", str(dfile), "--classifier", str(cfile)])
    out, err = capsys.readouterr()
    assert rc == 1 and "1 missing tensor(s): middle_block.1.qkv.weight" in err
    assert "1 unexpected tensor(s): extra.weight" in err
    assert main(["models", "import-reference", "wolleb", str(dfile)]) == 1
    assert "--classifier FILE" in capsys.readouterr().err
    assert not (cache / "manifest.json").exists()
