"""Models built from a :class:`~mura_tune.train.config.TrainConfig`.

* ``custom_cnn``: the cell design of the source reports, made searchable — ``depth`` cells of
  (conv → BatchNorm? → ReLU) × ``convs_per_cell`` → max-pool, filters doubling per cell from
  ``base_filters`` up to ``max_filters``; optional Dropout2d after each cell.
* timm backbones (DenseNet-121/169/201, ResNet-18/34/50, EfficientNet-B0).

Both end in global pooling (``global_pool``: average, max, or their mean), an optional MLP head
(``head_widths``, ``head_dropout``), dropout and a single logit. ``unfreeze_blocks=K`` trains only the last K *blocks* of the
backbone (plus the head); 0 trains the head only, ``"all"`` everything. Blocks per family:

* DenseNet: stem | denseblock1+transition1 | denseblock2+transition2 | denseblock3+transition3 | denseblock4+norm5
* ResNet: stem | layer1 | layer2 | layer3 | layer4
* EfficientNet: stem | blocks[0] | ... | blocks[5] | blocks[6]+conv_head+bn2
* custom_cnn: cell1 | ... | cellN

Frozen blocks are also kept in eval mode, so their BatchNorm statistics do not move either.
"""

from __future__ import annotations

import torch
from torch import nn

from mura_tune.train.config import CUSTOM_CNN, TrainConfig
from mura_tune.train.weights import load_backbone_state


class CustomCNN(nn.Module):
    """Stacked conv cells with doubling filters (the reports' hand-searched architecture)."""

    def __init__(
        self,
        depth: int,
        base_filters: int,
        max_filters: int,
        convs_per_cell: int,
        batch_norm: bool,
        spatial_dropout: float,
        in_chans: int = 3,
    ):
        super().__init__()
        cells = []
        channels = in_chans
        for i in range(depth):
            width = min(base_filters * 2**i, max_filters)
            layers: list[nn.Module] = []
            for _ in range(convs_per_cell):
                layers.append(nn.Conv2d(channels, width, 3, padding=1, bias=not batch_norm))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(width))
                layers.append(nn.ReLU(inplace=True))
                channels = width
            layers.append(nn.MaxPool2d(2, ceil_mode=True))  # a 1x1 map stays 1x1 in deep cells
            if spatial_dropout > 0:
                layers.append(nn.Dropout2d(spatial_dropout))
            cells.append(nn.Sequential(*layers))
        self.cells = nn.Sequential(*cells)
        self.num_features = channels

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.cells(x)


class MuraNet(nn.Module):
    """Backbone → global pool → MLP head → one logit (abnormal)."""

    def __init__(
        self,
        backbone: nn.Module,
        num_features: int,
        head_widths: list[int],
        head_dropout: float,
        dropout: float,
        global_pool: str = "avg",
    ):
        super().__init__()
        self.backbone = backbone
        self.global_pool = global_pool
        layers: list[nn.Module] = []
        width = num_features
        for hidden in head_widths:
            layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            if head_dropout > 0:
                layers.append(nn.Dropout(head_dropout))
            width = hidden
        layers += [nn.Dropout(dropout), nn.Linear(width, 1)]
        self.head = nn.Sequential(*layers)
        self.frozen: list[nn.Module] = []

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map (B, C, h, w): what Grad-CAM looks at."""
        return self.backbone.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.forward_features(x))).squeeze(1)

    def pool(self, fmap: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, C). Max pooling lets one small finding decide, as in multiple-instance learning."""
        if self.global_pool == "max":
            return fmap.amax(dim=(2, 3))
        if self.global_pool == "avgmax":
            return 0.5 * (fmap.mean(dim=(2, 3)) + fmap.amax(dim=(2, 3)))
        return fmap.mean(dim=(2, 3))

    def train(self, mode: bool = True) -> MuraNet:
        super().train(mode)
        for module in self.frozen:
            module.eval()
        return self


def backbone_blocks(model: str, backbone: nn.Module) -> list[list[nn.Module]]:
    """The backbone's blocks in input-to-output order (see module docstring)."""
    if model == CUSTOM_CNN:
        return [[cell] for cell in backbone.cells]
    if model.startswith("densenet"):
        f = backbone.features
        stem = [m for name, m in f.named_children() if name in ("conv0", "norm0", "pool0", "stem")]
        blocks = [stem]
        for k in range(1, 5):
            block = [getattr(f, f"denseblock{k}")]
            if hasattr(f, f"transition{k}"):
                block.append(getattr(f, f"transition{k}"))
            blocks.append(block)
        blocks[-1].append(f.norm5)
        return blocks
    if model.startswith("resnet"):
        stem = [backbone.conv1, backbone.bn1]
        return [stem] + [[getattr(backbone, f"layer{k}")] for k in range(1, 5)]
    if model.startswith("efficientnet"):
        stages = [[stage] for stage in backbone.blocks]
        stages[-1] += [backbone.conv_head, backbone.bn2]
        return [[backbone.conv_stem, backbone.bn1]] + stages
    raise ValueError(f"no block definition for {model}")


def apply_unfreeze(net: MuraNet, model: str, unfreeze_blocks: int | str) -> None:
    """Freeze all but the last ``unfreeze_blocks`` blocks of the backbone (head always trains)."""
    blocks = backbone_blocks(model, net.backbone)
    k = len(blocks) if unfreeze_blocks == "all" else min(int(unfreeze_blocks), len(blocks))
    frozen = [m for block in blocks[: len(blocks) - k] for m in block]
    for module in frozen:
        for param in module.parameters():
            param.requires_grad_(False)
    net.frozen = frozen


def count_parameters(net: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return trainable, total


def build_model(
    config: TrainConfig, backbone_state: dict | None = None, timm_pretrained: bool = False
) -> MuraNet:
    """Build the network for ``config``.

    Args:
        config: the run's configuration.
        backbone_state: weights for the backbone (from a local file); head keys are ignored.
        timm_pretrained: let timm load its ImageNet weights (see :mod:`mura_tune.train.weights`).
    """
    if config.model == CUSTOM_CNN:
        backbone = CustomCNN(
            config.depth,
            config.base_filters,
            config.max_filters,
            config.convs_per_cell,
            config.batch_norm,
            config.spatial_dropout,
        )
        num_features = backbone.num_features
    else:
        import timm

        backbone = timm.create_model(config.model, pretrained=timm_pretrained, num_classes=0)
        num_features = backbone.num_features
    if backbone_state is not None:
        load_backbone_state(backbone, backbone_state, config.model)
    net = MuraNet(
        backbone,
        num_features,
        list(config.head_widths),
        config.head_dropout,
        config.dropout,
        config.global_pool,
    )
    apply_unfreeze(net, config.model, config.unfreeze_blocks)
    return net
