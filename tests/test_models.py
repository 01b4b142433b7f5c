"""Every registered model runs forward and backward at 28, 64 and 224 px."""

from __future__ import annotations

import pytest
import torch

from histodistill import models

BATCH = {28: 4, 64: 2, 224: 2}


@pytest.mark.slow
@pytest.mark.parametrize("size", [28, 64, 224])
@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_forward_backward_any_size(name, size):
    torch.manual_seed(0)
    net = models.build(name, num_classes=3, im_size=size)
    if name in ("resnet18", "densenet121"):
        net.train()  # batchnorm with a batch of 2 still trains
    x = torch.randn(BATCH[size], 3, size, size, requires_grad=True)
    out = net(x)
    assert out.shape == (BATCH[size], 3)
    assert net.embed(x).shape[0] == BATCH[size]
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_registry_has_the_papers_architectures():
    assert {"convnet", "resnetap10", "resnet18", "densenet121", "vit", "alexnet", "lenet",
            "vgg11"} <= set(models.MODELS)
    with pytest.raises(KeyError, match="unknown model 'resnet50'"):
        models.build("resnet50", 2, 32)


def test_convnet_options_change_the_network():
    net = models.build("convnet", 2, 32, width=16, depth=2, norm="batchnorm")
    assert isinstance(net.body[1], torch.nn.BatchNorm2d) and net.head.in_features == 16 * 8 * 8
    assert isinstance(models.build("convnet", 2, 32).body[1], torch.nn.GroupNorm)


def test_resnetap_downsamples_by_pooling_not_stride():
    net = models.build("resnetap10", 2, 32)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.stride == (1, 1) for c in convs)
