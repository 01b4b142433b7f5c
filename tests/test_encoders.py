"""Feature encoders (supervised, SimCLR, CLAM's truncated ResNet50, timm architectures), the
resumable training loop they share with the full-data upper bound, and the joined result file."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torchvision

from conftest import AUGMENT, ENCODER, TRAIN, make_toy_store
from histodistill import models
from histodistill.data.store import PatchStore
from histodistill.encoders import (embed_array, embed_split, load_encoder, nt_xent,
                                   train_encoder)
from histodistill.state import Checkpoint
from histodistill.training import TrainConfig, tensor_batches, train
from histodistill.io import InputError
from histodistill.results import assemble

NET = {"width": 8, "norm": "batchnorm"}


def test_nt_xent_known_answer():
    # two patches whose views agree exactly and are orthogonal to each other: each view's
    # logits are 1/t for its partner and 0 for the two others
    z = torch.eye(2)
    t = 0.5
    assert nt_xent(z, z, t).item() == pytest.approx(math.log(1 + 2 * math.exp(-1 / t)))
    swapped = nt_xent(z, z.flip(0), t)  # partners point the wrong way: a larger loss
    assert swapped.item() > nt_xent(z, z, t).item() + 1


class _Interrupted(Exception):
    pass


def test_interrupted_training_resumes_to_the_same_weights(tmp_path):
    gen0 = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, 8, 8, generator=gen0)
    y = (x.mean((1, 2, 3)) > 0).long()
    cfg = TrainConfig.from_config({**TRAIN, "epochs": 4, "lr": 0.05, "batch": 16, "schedule": "step"})

    def fresh() -> tuple[torch.nn.Module, torch.Generator]:
        torch.manual_seed(1)
        return models.build("convnet", 2, 8, width=4, depth=1, norm="none"), torch.Generator().manual_seed(2)

    net, gen = fresh()
    train(net, tensor_batches(x, y, cfg.batch, gen), cfg, gen)
    expected = net.state_dict()

    ckpt = Checkpoint(tmp_path / "run.ckpt", key="k")
    net, gen = fresh()
    inner = tensor_batches(x, y, cfg.batch, gen)

    def failing(epoch: int):
        if epoch == 2:
            raise _Interrupted
        return inner(epoch)

    with pytest.raises(_Interrupted):
        train(net, failing, cfg, gen, checkpoint=ckpt, curve={})
    net, gen = fresh()  # a new process: fresh objects, state from the checkpoint
    curve: dict = {}
    train(net, tensor_batches(x, y, cfg.batch, gen), cfg, gen, checkpoint=ckpt, curve=curve)
    for k, v in net.state_dict().items():
        assert torch.equal(v, expected[k]), k
    assert len(curve["loss"]) == 4  # epochs before the interruption kept
    other = Checkpoint(tmp_path / "run.ckpt", key="other settings")
    assert other.load() is None  # another key never resumes


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory):
    return make_toy_store(tmp_path_factory.mktemp("enc") / "toy.zarr", n_per_class=32, size=16)


@pytest.mark.slow
def test_supervised_encoder_separates_classes_and_round_trips(toy, tmp_path):
    cfg = {**ENCODER, "kind": "supervised", "net": "convnet", "net_kwargs": NET, "seed": 0,
           "train": {**TRAIN, "epochs": 3, "lr": 0.05, "batch": 16}, "augment": {**AUGMENT, "preset": "none"}}
    enc = train_encoder(toy, tmp_path / "sup.pt", cfg, cache_mb=8)
    loaded = load_encoder(tmp_path / "sup.pt", torch.device("cpu"))
    store = PatchStore(toy)
    feats, labels, rows = embed_split(loaded, store, "test", batch=5)
    assert np.array_equal(rows, store.indices("test")) and feats.shape == (len(rows), enc.dim)
    direct = embed_array(enc, store.patches(rows), batch=7)
    np.testing.assert_allclose(feats, direct, rtol=1e-5, atol=1e-5)  # saved = trained encoder
    prob = loaded.probabilities(torch.from_numpy(store.patches(rows))).numpy()
    assert (prob.argmax(1) == labels).mean() == 1.0  # dark vs bright: learned
    # nearest class centroid in feature space also separates them
    centroids = np.stack([feats[labels == c].mean(0) for c in (0, 1)])
    nearest = ((feats[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (nearest == labels).mean() == 1.0


@pytest.mark.slow
def test_simclr_encoder_resumes_to_the_same_weights(toy, tmp_path, monkeypatch):
    cfg = {**ENCODER, "kind": "simclr", "net": "convnet", "net_kwargs": NET, "seed": 0, "proj_dim": 8,
           "temperature": 0.5, "train": {**TRAIN, "epochs": 2, "lr": 1e-3, "batch": 16},
           "augment": {**AUGMENT, "preset": "simclr"}}
    whole = train_encoder(toy, tmp_path / "a.pt", cfg, cache_mb=8)
    ckpt = tmp_path / "b.ckpt"
    real_save = Checkpoint.save

    def save_then_stop(self, state):
        real_save(self, state)
        raise _Interrupted  # the job dies right after its first epoch's checkpoint

    monkeypatch.setattr(Checkpoint, "save", save_then_stop)
    with pytest.raises(_Interrupted):
        train_encoder(toy, tmp_path / "b.pt", cfg, cache_mb=8, checkpoint=ckpt)
    monkeypatch.setattr(Checkpoint, "save", real_save)
    assert ckpt.exists() and not (tmp_path / "b.pt").exists()
    resumed = train_encoder(toy, tmp_path / "b.pt", cfg, cache_mb=8, checkpoint=ckpt)
    assert not ckpt.exists()  # removed once the encoder is saved
    for (k, a), b in zip(whole.net.state_dict().items(), resumed.net.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.slow
def test_resnet50_trunc_loads_local_weights_and_refuses_none(toy, tmp_path):
    cfg = {**ENCODER, "kind": "resnet50_trunc", "net": "resnet18", "seed": 0}
    with pytest.raises(InputError, match=r"\[train_encoder\] encoders.<name>.weights: .*local"):
        train_encoder(toy, tmp_path / "r.pt", cfg, cache_mb=8)
    with pytest.raises(InputError, match="does not exist"):
        train_encoder(toy, tmp_path / "r.pt", cfg, cache_mb=8, weights=tmp_path / "missing.pth")
    torch.manual_seed(0)
    full = torchvision.models.resnet50(weights=None).eval()
    torch.save(full.state_dict(), tmp_path / "r50.pth")
    train_encoder(toy, tmp_path / "r.pt", cfg, cache_mb=8, weights=tmp_path / "r50.pth")
    enc = load_encoder(tmp_path / "r.pt", torch.device("cpu"))
    x = torch.from_numpy(PatchStore(toy).patches(slice(0, 3)))
    feats = enc.embed(x)
    with torch.no_grad():
        inp = enc.stats.normalise(x)
        f = full.layer3(full.layer2(full.layer1(full.maxpool(full.relu(full.bn1(full.conv1(inp)))))))
    assert feats.shape == (3, 1024)
    torch.testing.assert_close(feats, f.mean((2, 3)))
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(InputError, match="not a ResNet50 state dict"):
        train_encoder(toy, tmp_path / "r2.pt", cfg, cache_mb=8, weights=tmp_path / "bad.pth")


def test_timm_encoder_loads_a_foundation_style_vit_from_a_local_file(toy, tmp_path):
    """A small timm ViT with random weights saved to a file stands for UNI: built headless from
    its name and keyword arguments, fed resized patches normalised as the weights expect; its
    features equal timm's own forward; a head in the file is left out; a file of another model
    is refused by name. Nothing is downloaded."""
    import timm
    from safetensors.torch import save_file

    kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 24, "depth": 2, "num_heads": 2}
    cfg = {**ENCODER, "kind": "timm", "model": "vit_tiny_patch16_224", "model_kwargs": kwargs,
           "input_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "seed": 0}
    with pytest.raises(InputError, match=r"encoders.<name>.weights: .*local weights file"):
        train_encoder(toy, tmp_path / "t.pt", cfg, cache_mb=8)
    torch.manual_seed(0)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, **kwargs).eval()
    save_file(reference.state_dict(), str(tmp_path / "vit.safetensors"))  # with its 3-class head
    train_encoder(toy, tmp_path / "t.pt", cfg, cache_mb=8, weights=tmp_path / "vit.safetensors")
    enc = load_encoder(tmp_path / "t.pt", torch.device("cpu"))
    x = torch.from_numpy(PatchStore(toy).patches(slice(0, 4)))  # 16 px patches, resized to 32
    feats = enc.embed(x)
    with torch.no_grad():
        inp = torch.nn.functional.interpolate((x.float() / 255 - 0.5) / 0.25, size=(32, 32),
                                              mode="bilinear", align_corners=False, antialias=True)
        expected = reference.forward_head(reference.forward_features(inp), pre_logits=True)
    assert feats.shape == (4, 24) and enc.dim == 24
    torch.testing.assert_close(feats, expected)
    other = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0,
                              **{**kwargs, "embed_dim": 16})
    torch.save(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(InputError, match="other.pth: not weights of this timm model"):
        train_encoder(toy, tmp_path / "t2.pt", cfg, cache_mb=8, weights=tmp_path / "other.pth")


def test_the_docs_uni_example_is_a_valid_config():
    """The encoders page's UNI block, merged over the shipped config, validates."""
    import re

    import yaml

    from conftest import ROOT
    from histodistill import config

    text = (ROOT / "docs/methods/encoders.md").read_text()
    block = yaml.safe_load(re.search(r"```yaml\n(.*?)```", text, re.S).group(1))
    cfg = config.validate(config.merge(config.read(ROOT / "config.yaml"), block))
    assert cfg["encoders"]["uni"]["kind"] == "timm" and cfg["mil"]["encoder"] == "uni"


def test_result_joins_sections_and_refuses_a_clash(tmp_path):
    (tmp_path / "patch.json").write_text(json.dumps({"method": "dm", "ipc": 2, "patch": {}}))
    (tmp_path / "privacy.json").write_text(json.dumps({"memorised": 0.0}))
    out = tmp_path / "dm_ipc2.json"
    got = assemble({"patch": tmp_path / "patch.json", "privacy": tmp_path / "privacy.json"}, out)
    assert json.loads(out.read_text()) == got == {"method": "dm", "ipc": 2, "patch": {},
                                                  "privacy": {"memorised": 0.0}}
    with pytest.raises(InputError, match="needs its patch-level evaluation"):
        assemble({"privacy": tmp_path / "privacy.json"}, tmp_path / "x.json")
    with pytest.raises(InputError, match="section 'method' is already"):
        assemble({"patch": tmp_path / "patch.json", "method": tmp_path / "privacy.json"},
                 tmp_path / "y.json")
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "y.json").exists()
