"""Patch classifiers, registered by name, randomly initialised (no downloaded weights).

Every model is a :class:`Classifier`: ``embed(x)`` gives (B, D) features (used by distribution
matching and herding) and ``head`` maps them to logits. All accept any square input size from
28 px up; small inputs get CIFAR-style stems (3x3 convolutions, no early downsampling).
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn
from histodistill.registry import registrar

MODELS: dict[str, type["Classifier"]] = {}


register = registrar(MODELS)


def build(name: str, num_classes: int, im_size: int, channels: int = 3, **kwargs) -> "Classifier":
    """Build model ``name`` for ``num_classes`` classes and ``im_size`` x ``im_size`` inputs."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; available: {sorted(MODELS)}")
    return MODELS[name](num_classes=num_classes, im_size=im_size, channels=channels, **kwargs)


def norm_layer(kind: str, width: int) -> nn.Module:
    """'instancenorm' (GroupNorm with one group per channel, as DC uses), 'batchnorm', 'none'."""
    if kind == "instancenorm":
        return nn.GroupNorm(width, width, affine=True)
    if kind == "batchnorm":
        return nn.BatchNorm2d(width)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; choose instancenorm, batchnorm or none")


class Classifier(nn.Module):
    """Features followed by a linear head."""

    head: nn.Linear

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def _feature_dim(body: nn.Module, channels: int, im_size: int) -> int:
    with torch.no_grad():
        return int(body(torch.zeros(1, channels, im_size, im_size)).flatten(1).shape[1])


@register("convnet")
class ConvNet(Classifier):
    """DC's ConvNet: ``depth`` x [conv3x3(width), norm, ReLU, avgpool2], then a linear head."""

    def __init__(self, num_classes: int, im_size: int, channels: int = 3, width: int = 128,
                 depth: int = 3, norm: str = "instancenorm") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = channels
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=1), norm_layer(norm, width), nn.ReLU(inplace=True),
                       nn.AvgPool2d(2)]
            c = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(_feature_dim(self.body, channels, im_size), num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).flatten(1)


class _APBlock(nn.Module):
    """ResNet basic block whose downsampling is average pooling instead of a strided conv."""

    def __init__(self, cin: int, cout: int, down: bool, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.n1 = norm_layer(norm, cout)
        self.pool = nn.AvgPool2d(2) if down else nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.n2 = norm_layer(norm, cout)
        self.short: nn.Module = nn.Identity()
        if down or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False),
                                       nn.AvgPool2d(2) if down else nn.Identity(),
                                       norm_layer(norm, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool(torch.relu(self.n1(self.conv1(x))))
        return torch.relu(self.n2(self.conv2(out)) + self.short(x))


@register("resnetap10")
class ResNetAP10(Classifier):
    """ResNet-10 (one basic block per stage) with average-pool downsampling (IDC, Histo-DD)."""

    def __init__(self, num_classes: int, im_size: int, channels: int = 3, width: int = 64,
                 norm: str = "instancenorm") -> None:
        super().__init__()
        stem = [nn.Conv2d(channels, width, 3, padding=1, bias=False), norm_layer(norm, width),
                nn.ReLU(inplace=True)]
        if im_size >= 64:  # large inputs: downsample early as ImageNet ResNets do
            stem.append(nn.AvgPool2d(4 if im_size >= 128 else 2))
        widths = [width, width * 2, width * 4, width * 8]
        blocks, c = [], width
        for i, w in enumerate(widths):
            blocks.append(_APBlock(c, w, down=i > 0, norm=norm))
            c = w
        self.body = nn.Sequential(*stem, *blocks, nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(c, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).flatten(1)


def torchvision_models() -> ModuleType:
    """``torchvision.models``, imported on first use: it costs every job that imports this module
    a second, and only ResNet18, DenseNet121 and the ResNet50 encoder need it."""
    import torchvision

    return torchvision.models


class _Torchvision(Classifier):
    """A torchvision backbone (random init) with a small-input stem where needed."""

    def __init__(self, backbone: nn.Module, dim: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


@register("resnet18")
class ResNet18(_Torchvision):
    def __init__(self, num_classes: int, im_size: int, channels: int = 3) -> None:
        net = torchvision_models().resnet18(weights=None)
        if im_size < 64:
            net.conv1 = nn.Conv2d(channels, 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        elif channels != 3:
            net.conv1 = nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
        net.fc = nn.Identity()
        super().__init__(net, 512, num_classes)


@register("densenet121")
class DenseNet121(_Torchvision):
    def __init__(self, num_classes: int, im_size: int, channels: int = 3) -> None:
        net = torchvision_models().densenet121(weights=None)
        if im_size < 64:
            net.features.conv0 = nn.Conv2d(channels, 64, 3, 1, 1, bias=False)
            net.features.pool0 = nn.Identity()
        elif channels != 3:
            net.features.conv0 = nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
        net.classifier = nn.Identity()
        super().__init__(net, 1024, num_classes)


def _vgg_or_alex(cfg: list, channels: int, im_size: int, norm: str, kernel: int = 3) -> nn.Sequential:
    """Conv stack from a VGG-style config; pooling stops once the map is 2x2."""
    layers: list[nn.Module] = []
    c, size = channels, im_size
    for item in cfg:
        if item == "M":
            if size >= 4:
                layers.append(nn.MaxPool2d(2))
                size //= 2
        else:
            k = item[1] if isinstance(item, tuple) else kernel
            w = item[0] if isinstance(item, tuple) else item
            layers += [nn.Conv2d(c, w, k, padding=k // 2), norm_layer(norm, w), nn.ReLU(inplace=True)]
            c = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


class _ConvStack(Classifier):
    """A VGG-style convolution stack (``CFG``) with global pooling and a linear head."""

    CFG: list = []
    NORM = "none"

    def __init__(self, num_classes: int, im_size: int, channels: int = 3, norm: str | None = None) -> None:
        super().__init__()
        self.body = _vgg_or_alex(self.CFG, channels, im_size, norm or self.NORM)
        last = self.CFG[-2] if self.CFG[-1] == "M" else self.CFG[-1]
        self.head = nn.Linear(last[0] if isinstance(last, tuple) else last, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@register("vgg11")
class VGG11(_ConvStack):
    """VGG-11 (configuration A) with instance norm and global pooling."""

    CFG = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]
    NORM = "instancenorm"


@register("alexnet")
class AlexNet(_ConvStack):
    """AlexNet's five-conv layout (5x5 then 3x3 convolutions, max pooling) for small patches."""

    CFG = [(64, 5), "M", (192, 5), "M", (384, 3), (256, 3), (256, 3), "M"]


@register("lenet")
class LeNet(Classifier):
    """LeNet-5: two 5x5 convolutions with pooling, then 120-84 fully connected layers."""

    def __init__(self, num_classes: int, im_size: int, channels: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(5), nn.Flatten(),
            nn.Linear(400, 120), nn.ReLU(inplace=True), nn.Linear(120, 84), nn.ReLU(inplace=True))
        self.head = nn.Linear(84, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@register("vit")
class ViT(Classifier):
    """A small Vision Transformer; the patch size is chosen so the image gives 4x4 to 8x8 tokens."""

    def __init__(self, num_classes: int, im_size: int, channels: int = 3, dim: int = 128,
                 depth: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.patch = max(2, im_size // 8)
        tokens = (im_size // self.patch) ** 2
        self.proj = nn.Conv2d(channels, dim, self.patch, stride=self.patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * 2, dropout=0.0, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        tok = self.proj(x).flatten(2).transpose(1, 2)
        tok = torch.cat([self.cls.expand(len(tok), -1, -1), tok], 1) + self.pos
        return self.norm(self.encoder(tok)[:, 0])
