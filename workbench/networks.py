"""The networks the original thread asked about, defined here: MobileNetV2, SqueezeNet 1.1 and
ShuffleNetV2 x1.0, at 224x224 by default.

Each is written in PyTorch as torchvision writes it (there is no CPU torchvision here), with
deterministic weights and batch-norm statistics from a seed (no download), exported to ONNX with
its BatchNormalization nodes kept, and read back through the same importer as any ONNX file
(`model.from_onnx_proto`), which folds each BatchNormalization into its conv and says so.
"""

from __future__ import annotations

import functools
import io
import warnings

from .errors import WorkbenchError
from .model import Model, from_onnx_proto

NETWORKS = ("mobilenet_v2", "squeezenet", "shufflenet_v2")
RESOLUTION = 224
MAX_RESOLUTION = 1024  # 1x3x1024x1024: larger exports take minutes and gigabytes


class NetworkError(WorkbenchError, ValueError):
    """A network name or size the workbench does not define."""


def network(name: str, resolution: int = RESOLUTION, classes: int = 1000, seed: int = 0) -> Model:
    """One of NETWORKS as a Model, read through the ONNX importer (BatchNormalization folded)."""
    if name not in NETWORKS:
        raise NetworkError(f"unknown network {name!r}; choose one of {', '.join(NETWORKS)} (or pass an ONNX file "
                           "with --model)")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or not 32 <= resolution <= MAX_RESOLUTION \
            or resolution % 32:
        raise NetworkError(f"resolution {resolution!r} must be a multiple of 32 from 32 to {MAX_RESOLUTION} (the "
                           "networks downsample by 32); 224 is the usual")
    return _imported(name, resolution, classes, seed)


@functools.lru_cache(maxsize=8)
def _imported(name: str, resolution: int, classes: int, seed: int) -> Model:
    import onnx

    proto = onnx.load_from_string(export_onnx(name, resolution, classes, seed))
    for node in proto.graph.node:
        node.name = short_name(node.name)
    return from_onnx_proto(proto, name=f"{name}-{resolution}", source=f"workbench.networks.{name}")


def short_name(scope: str) -> str:
    """torch's scoped node name without the parents it repeats: '/features/features.1/conv/conv.0/conv.0.0/Conv'
    becomes 'features.1/conv.0.0/Conv' (each scope names its child with its own name as a prefix)."""
    parts = [p for p in scope.split("/") if p]
    kept = [p for p, child in zip(parts, parts[1:] + [""]) if not child.startswith(p + ".")]
    return "/".join(kept) or scope


def export_onnx(name: str, resolution: int = RESOLUTION, classes: int = 1000, seed: int = 0, opset: int = 17) -> bytes:
    """The network's ONNX file as bytes, BatchNormalization kept (exported as trained, in eval mode)."""
    import torch

    module = torch_network(name, classes, seed)
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated; it needs no onnxscript
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(1, 3, resolution, resolution),), buffer, dynamo=False,
                          opset_version=opset, input_names=["input"], output_names=["logits"],
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    return buffer.getvalue()


def torch_network(name: str, classes: int = 1000, seed: int = 0):
    """The PyTorch module, in eval mode, with seeded weights and batch-norm statistics."""
    import torch

    torch.manual_seed(seed)
    module = {"mobilenet_v2": _mobilenet_v2, "squeezenet": _squeezenet, "shufflenet_v2": _shufflenet_v2}[name](classes)
    _seed_batch_norms(module, seed)
    return module.eval()


def _seed_batch_norms(module, seed: int) -> None:
    """Statistics a trained network could have, so folding them changes the weights visibly."""
    import torch

    generator = torch.Generator().manual_seed(seed + 7)
    for bn in module.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            c = bn.num_features
            with torch.no_grad():
                bn.weight.copy_(torch.rand(c, generator=generator) * 0.5 + 0.75)
                bn.bias.copy_(torch.randn(c, generator=generator) * 0.1)
                bn.running_mean.copy_(torch.randn(c, generator=generator) * 0.1)
                bn.running_var.copy_(torch.rand(c, generator=generator) * 0.5 + 0.75)


# ---------------------------------------------------------------- the architectures (torchvision's)

def _conv_bn(nn, cin, cout, kernel, stride, groups=1, act="relu6"):
    layers = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6(inplace=True) if act == "relu6" else nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _mobilenet_v2(classes: int):
    import torch.nn as nn

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, expand):
            super().__init__()
            hidden = cin * expand
            self.residual = stride == 1 and cin == cout
            layers = [_conv_bn(nn, cin, hidden, 1, 1)] if expand != 1 else []
            layers += [_conv_bn(nn, hidden, hidden, 3, stride, groups=hidden), _conv_bn(nn, hidden, cout, 1, 1, act=None)]
            self.conv = nn.Sequential(*layers)

        def forward(self, x):
            return x + self.conv(x) if self.residual else self.conv(x)

    # (expansion t, channels c, repeats n, stride s), as in the paper and torchvision
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    features, cin = [_conv_bn(nn, 3, 32, 3, 2)], 32
    for t, c, n, s in settings:
        for i in range(n):
            features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
            cin = c
    features.append(_conv_bn(nn, cin, 1280, 1, 1))

    class MobileNetV2(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(*features)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, classes))

        def forward(self, x):
            x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
            return self.classifier(x.flatten(1))

    return _he_init(MobileNetV2())


def _squeezenet(classes: int):
    import torch
    import torch.nn as nn

    class Fire(nn.Module):
        def __init__(self, cin, squeeze, expand):
            super().__init__()
            self.squeeze = nn.Sequential(nn.Conv2d(cin, squeeze, 1), nn.ReLU(inplace=True))
            self.expand1x1 = nn.Sequential(nn.Conv2d(squeeze, expand, 1), nn.ReLU(inplace=True))
            self.expand3x3 = nn.Sequential(nn.Conv2d(squeeze, expand, 3, padding=1), nn.ReLU(inplace=True))

        def forward(self, x):
            x = self.squeeze(x)
            return torch.cat([self.expand1x1(x), self.expand3x3(x)], 1)

    pool = functools.partial(nn.MaxPool2d, 3, 2, ceil_mode=True)

    class SqueezeNet11(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 64, 3, 2), nn.ReLU(inplace=True), pool(), Fire(64, 16, 64), Fire(128, 16, 64), pool(),
                Fire(128, 32, 128), Fire(256, 32, 128), pool(), Fire(256, 48, 192), Fire(384, 48, 192),
                Fire(384, 64, 256), Fire(512, 64, 256))
            self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(512, classes, 1), nn.ReLU(inplace=True),
                                            nn.AdaptiveAvgPool2d((1, 1)))

        def forward(self, x):
            return torch.flatten(self.classifier(self.features(x)), 1)

    return _he_init(SqueezeNet11())


def _shufflenet_v2(classes: int):
    import torch
    import torch.nn as nn

    def shuffle(x, groups=2):
        n, c, h, w = x.shape
        return x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, c, h, w)

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.stride, half = stride, cout // 2
            if stride > 1:
                self.branch1 = nn.Sequential(_conv_bn(nn, cin, cin, 3, stride, groups=cin, act=None),
                                             _conv_bn(nn, cin, half, 1, 1, act="relu"))
            into = cin if stride > 1 else half
            self.branch2 = nn.Sequential(_conv_bn(nn, into, half, 1, 1, act="relu"),
                                         _conv_bn(nn, half, half, 3, stride, groups=half, act=None),
                                         _conv_bn(nn, half, half, 1, 1, act="relu"))

        def forward(self, x):
            if self.stride == 1:
                x1, x2 = x.chunk(2, dim=1)
                out = torch.cat((x1, self.branch2(x2)), dim=1)
            else:
                out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
            return shuffle(out)

    class ShuffleNetV2(nn.Module):
        def __init__(self, repeats=(4, 8, 4), channels=(24, 116, 232, 464, 1024)):
            super().__init__()
            self.conv1 = _conv_bn(nn, 3, channels[0], 3, 2, act="relu")
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            stages, cin = [], channels[0]
            for n, cout in zip(repeats, channels[1:4]):
                stages += [InvertedResidual(cin, cout, 2)] + [InvertedResidual(cout, cout, 1) for _ in range(n - 1)]
                cin = cout
            self.stages = nn.Sequential(*stages)
            self.conv5 = _conv_bn(nn, cin, channels[-1], 1, 1, act="relu")
            self.fc = nn.Linear(channels[-1], classes)

        def forward(self, x):
            x = self.conv5(self.stages(self.maxpool(self.conv1(x))))
            return self.fc(x.mean([2, 3]))

    return _he_init(ShuffleNetV2())


def _he_init(module):
    """He-normal convs (activations keep their scale through the depth), small linear weights."""
    import torch.nn as nn

    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.uniform_(m.bias, -0.1, 0.1)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, (1.0 / m.in_features) ** 0.5)
            nn.init.uniform_(m.bias, -0.1, 0.1)
    return module
