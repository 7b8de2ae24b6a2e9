"""An ensemble as one ``torch.nn.Module``: a study's images in, its probability out (what export traces).

:class:`EnsembleGraph` computes exactly what :mod:`mura_tune.ensemble.predict` computes for one
study, with every step inside the graph:

1. each input (one per member image size: ``images_<S>``, float32 ``(views, 1, S, S)`` in [0, 1],
   the letterboxed images divided by 255) is replicated to 3 channels and ImageNet-normalised;
2. every member runs on its size's input (averaging its logit with the horizontal flip's when it
   was trained with ``tta_flip``), and its image probabilities (sigmoid) are averaged over the
   study's views;
3. ``body_part`` (int64 ``(1,)``, an index into :attr:`RouteTable.parts`) picks the route: a part
   served by its own ensemble uses that ensemble's weights, every other part (and ``unknown``,
   and any index out of range) the generalist's; the output ``probability`` (float32 ``(1,)``)
   is the weighted sum of the members' study probabilities. Members outside the route have weight 0.

All members run on every study (their outputs are cheap next to reading the images), so the graph
has no data-dependent control flow and traces as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mura_tune.constants import BODY_PARTS, IMAGENET_MEAN, IMAGENET_STD
from mura_tune.ensemble.sidecar import BODY_PART_INPUT, UNKNOWN_PART, images_input
from mura_tune.layout import GENERALIST_ENSEMBLE


@dataclass(frozen=True)
class RouteTable:
    """How a study's body part picks its member weights.

    Attributes:
        parts: the body-part index: ``parts[i]`` is the part whose studies pass ``body_part = i``
            (the 7 MURA parts, then any other routed part, then ``unknown`` last).
        routes: the ensembles in use, generalist first (``GENERALIST_ENSEMBLE`` or a part).
        members: the members' checkpoints, in graph order.
        weights: ``weights[r][m]``: the weight of member ``m`` in route ``r``.
        route_of_part: ``route_of_part[i]``: the route of part index ``i``.
    """

    parts: tuple[str, ...]
    routes: tuple[str, ...]
    members: tuple[Path, ...]
    weights: tuple[tuple[float, ...], ...]
    route_of_part: tuple[int, ...]

    @classmethod
    def from_routes(cls, keyed: dict[str, list[tuple[Path, float]]]) -> RouteTable:
        """Build from predict's routes (``{GENERALIST_ENSEMBLE | part: [(checkpoint, weight)]}``)."""
        routes = (GENERALIST_ENSEMBLE, *sorted(k for k in keyed if k != GENERALIST_ENSEMBLE))
        members = tuple(dict.fromkeys(path for key in routes for path, _ in keyed[key]))
        weights = []
        for key in routes:
            row = [0.0] * len(members)
            for path, weight in keyed[key]:  # a checkpoint listed twice adds up, as in predict
                row[members.index(path)] += float(weight)
            weights.append(tuple(row))
        extra = sorted(set(routes) - {GENERALIST_ENSEMBLE, *BODY_PARTS})
        parts = (*BODY_PARTS, *extra, UNKNOWN_PART)
        route_of_part = tuple(routes.index(p) if p in routes else 0 for p in parts)
        return cls(parts, routes, members, tuple(weights), route_of_part)


class EnsembleGraph(torch.nn.Module):
    """Every member, the weights, the routing, the flips and the mean over views, in one module.

    Args:
        nets: the members' networks (float32, eval mode), in :attr:`RouteTable.members` order.
        sizes: each member's input size.
        flips: each member's ``tta_flip``.
        table: the routing.

    ``forward(body_part, *images)`` takes the inputs in :attr:`input_names` order.
    """

    def __init__(
        self, nets: list[torch.nn.Module], sizes: list[int], flips: list[bool], table: RouteTable
    ):
        super().__init__()
        self.members = torch.nn.ModuleList(nets)
        self.sizes = sorted(set(sizes))
        self.member_input = [self.sizes.index(s) for s in sizes]
        self.flips = [bool(f) for f in flips]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.register_buffer("weights", torch.tensor(table.weights, dtype=torch.float32))
        self.register_buffer("route_of_part", torch.tensor(table.route_of_part, dtype=torch.int64))

    @property
    def input_names(self) -> list[str]:
        return [BODY_PART_INPUT, *(images_input(s) for s in self.sizes)]

    def forward(self, body_part: torch.Tensor, *images: torch.Tensor) -> torch.Tensor:
        normalised = [(x.expand(-1, 3, -1, -1) - self.mean) / self.std for x in images]
        probs = []
        for net, k, flip in zip(self.members, self.member_input, self.flips):
            x = normalised[k]
            logits = net(x)
            if flip:
                logits = (logits + net(torch.flip(x, dims=[3]))) / 2
            probs.append(torch.sigmoid(logits).mean())
        n_parts = self.route_of_part.shape[0]
        known = (body_part >= 0) & (body_part < n_parts)
        part = torch.where(known, body_part, torch.full_like(body_part, n_parts - 1))
        weights = self.weights[self.route_of_part[part]]  # (1, members)
        return (weights * torch.stack(probs)).sum(dim=1)
