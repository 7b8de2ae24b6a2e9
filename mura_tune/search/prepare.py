"""Preparing an experiment in the driver, before any trial: the split, the image cache, the starting weights."""

from __future__ import annotations

import logging

from mura_tune.data.cache import build_cache
from mura_tune.data.mura import read_dataset
from mura_tune.data.split import assign_split, write_split
from mura_tune.errors import ExperimentError
from mura_tune.io import write_parquet
from mura_tune.search.plan import SearchPlan
from mura_tune.search.spaces import get_space
from mura_tune.train.pretrain import resolve_pretrained
from mura_tune.train.weights import check_weights_split

log = logging.getLogger(__name__)


def prepare_experiment(plan: SearchPlan) -> None:
    """Write the split once, build the shared image cache and resolve the starting weights.

    ``pretrained: auto`` and ``bodypart`` are resolved per backbone with the experiment's own
    split (body-part weights see its train images only), and every weights file a trial may
    start from is checked against that split here, before any trial starts.
    """
    exp = plan.experiment
    exp.path.mkdir(parents=True, exist_ok=True)
    table = assign_split(read_dataset(plan.data).table, plan.val_fraction, plan.seed)
    write_split(table, plan.split_path)
    cache = build_cache(table["image_path"].tolist(), int(plan.fixed.get("image_size", 64)))
    if len(cache.unreadable):
        write_parquet(exp.skipped, cache.unreadable)
        if plan.strict:  # one line: the error, not a "will be skipped" notice before it
            first = cache.unreadable.iloc[0]
            raise ExperimentError(
                f"{len(cache.unreadable)} unreadable image(s), e.g. {first['image_path']}: {first['reason']} "
                f"(--strict; list in {exp.skipped})"
            )
        log.warning(
            "%d unreadable image(s) will be skipped; list in %s", len(cache.unreadable), exp.skipped
        )
    prepare_weights(
        plan, table, {"seed": plan.seed, "val_fraction": plan.val_fraction, "path": plan.split_path}
    )


def prepare_weights(plan: SearchPlan, table, split_info: dict) -> None:
    """Resolve ``pretrained: auto``/``bodypart`` per backbone and check every weights file against the split."""
    pretrained = plan.fixed.get("pretrained", "none")
    if pretrained in ("auto", "bodypart"):
        image_size = int(plan.fixed.get("image_size", 64))
        plan.fixed["pretrained_by_model"] = {
            m: resolve_pretrained(m, pretrained, table, image_size, split_info=split_info)[0]
            for m in _space_models(plan)
        }
    for source in {pretrained, *plan.fixed.get("pretrained_by_model", {}).values()}:
        check_weights_split(source, table)


def _space_models(plan: SearchPlan) -> list[str]:
    space = get_space(plan.space)
    if "model" in plan.fixed:
        return [plan.fixed["model"]]
    dims = space.dimensions()
    if "model" in dims:
        args = space.presets.get(plan.preset, {}).get("space_args", {})
        return list(args.get("backbones") or dims["model"].choices)
    return ["custom_cnn"]
