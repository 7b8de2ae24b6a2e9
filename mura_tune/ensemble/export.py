"""Export an ensemble as one model a standard runtime runs, checked against ``predict`` before it is written.

    mura-tune export --ensemble ensembles/demo --format onnx                  # ensembles/demo/model.onnx
    mura-tune export --ensemble ensembles/demo --format torchscript --out demo.pt

The model (:class:`~mura_tune.ensemble.graph.EnsembleGraph`) takes one study and returns its
abnormality probability exactly as ``mura-tune predict`` computes it: every member, the weights,
the per-part routing (the body part is an input), the flip of members trained with ``tta_flip``
and the mean over the study's views are inside the graph. Inputs:

* ``body_part``: int64 ``(1,)``, the study's index in the sidecar's ``body_parts`` (the 7 MURA
  parts, then ``unknown``; any index out of range counts as ``unknown`` and uses the generalist);
* ``images_<S>``, one per member input size S: float32 ``(views, 1, S, S)``, the study's views
  decoded to 8-bit grayscale, letterboxed (zero-padded to a centred square, Pillow bilinear
  resize to S) and divided by 255. Replication to 3 channels and the ImageNet normalisation are
  inside the graph.

Output ``probability``: float32 ``(1,)``. The sidecar ``OUT.json`` describes every preprocessing
step so that it can be reproduced without mura-tune (``tests/test_export.py`` does it with NumPy
and Pillow alone); the ONNX metadata holds the decision thresholds (the manifest's fitted
``thresholds`` per part, else 0.5), the body-part index and the preprocessing.

Before anything is written, the exported model runs in ONNX Runtime (or TorchScript) on a sample
of the experiment's val studies (``check_studies``, every body part in turn) beside predict's own
computation; a maximum absolute difference above ``tolerance`` (1e-4) refuses the export. Members
are rebuilt by the checkpoint loader predict uses and traced in float32 eval mode on the CPU.
``onnx``, ``onnxruntime`` and ``onnxscript`` are needed only here (``pip install 'mura-tune[export]'``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mura_tune.data.images import ImageReadError, letterbox, load_gray
from mura_tune.ensemble.sidecar import describe, sidecar_path
from mura_tune.errors import ConfigError, ExperimentError
from mura_tune.io import atomic_path, write_json
from mura_tune.layout import SPLIT_FILE, EnsembleDir, read_manifest

log = logging.getLogger(__name__)

#: Format -> the file suffix of its model.
FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
#: The Python packages each format needs beyond mura-tune's own (the ``export`` extra).
NEEDS = {"onnx": ("onnx", "onnxruntime", "onnxscript"), "torchscript": ()}
TOLERANCE = 1e-4
CHECK_STUDIES = 32
#: Above this many bytes of weights, ONNX keeps them in ``OUT.data`` beside the model (protobuf's 2 GiB limit).
ONNX_INLINE_LIMIT = 1_800_000_000


@dataclass
class ExportResult:
    """What :func:`export_ensemble` wrote and how it checked it."""

    model: Path
    sidecar: Path
    max_abs_diff: float  # against predict, over the checked studies
    n_studies: int
    seconds: float  # building, tracing, checking and writing
    size_bytes: int  # the model file (and its external data, if any)


def export_ensemble(
    ensemble_dir: str | Path,
    format: str = "onnx",
    out: str | Path | None = None,
    data: str | Path | None = None,
    check_studies: int = CHECK_STUDIES,
    tolerance: float = TOLERANCE,
    seed: int = 0,
) -> ExportResult:
    """Export the ensemble in ``ensemble_dir`` as one model and check it against predict.

    Args:
        ensemble_dir: ``ensembles/<name>`` (with ``manifest.json``).
        format: ``onnx`` or ``torchscript``.
        out: the model file (default ``<ensemble_dir>/model.onnx`` or ``model.pt``); the sidecar
            is ``OUT.json``.
        data: studies to check on (anything ``predict --data`` reads; default: the experiment's
            val studies, from the manifest's split).
        check_studies: how many studies to check (every body part in turn).
        tolerance: the largest absolute difference from predict that is accepted.
        seed: which studies are sampled.

    Returns:
        The :class:`ExportResult`.

    Raises:
        ConfigError: an unknown format, a missing optional package, or a bad number.
        ExperimentError: no manifest, a corrupt one, a member checkpoint that is gone, no
            studies to check on, or a model that does not reproduce predict (nothing is written).
    """
    started = time.perf_counter()
    check_format(format)
    if check_studies < 1:
        raise ConfigError(f"--check-studies must be >= 1, got {check_studies}")
    folder = EnsembleDir(Path(ensemble_dir).expanduser())
    manifest = read_manifest(folder.path)
    routes = read_routes(manifest, folder.manifest)
    out = Path(out).expanduser() if out else folder.exported(FORMATS[format])
    images, where = check_images(manifest, data, check_studies, seed)

    from mura_tune.ensemble.graph import EnsembleGraph, RouteTable
    from mura_tune.ensemble.predict import load_members
    from mura_tune.train.engine import Engine

    engine = Engine("cpu")  # float32, the checkpoint loader predict uses
    members, keyed = load_members(routes, manifest, folder.manifest, engine)
    table = RouteTable.from_routes(keyed)
    chosen = [members[path] for path in table.members]
    graph = EnsembleGraph(
        [m.net.float().eval() for m in chosen],
        [m.image_size for m in chosen],
        [m.tta_flip for m in chosen],
        table,
    ).eval()
    reference = reference_probabilities(images, members, keyed, engine)
    spec = describe(manifest, graph, table, chosen, format, out)
    extra = out.with_name(out.name + ".data")  # ONNX's external weights, only above the limit
    try:
        with atomic_path(out, suffix=FORMATS[format]) as tmp:
            write_model(graph, format, tmp, spec, external=extra)
            exported = load_runner(format, tmp, graph.input_names)
            diff = compare(exported, images, reference, graph.sizes, table.parts)
            log.info(
                f"checked on {len(reference)} studies ({where}): max |{format} - predict| = "
                f"{diff:.2e} (tolerance {tolerance:g})"
            )
            if not diff <= tolerance:
                raise ExperimentError(
                    f"export check failed: the {format} model differs from predict by {diff:.2e} "
                    f"(> {tolerance:g}) on {len(reference)} studies ({where}); nothing written to {out}"
                )
    except BaseException:
        extra.unlink(missing_ok=True)
        raise
    spec["check"] = {
        "against": "mura-tune predict",
        "studies": len(reference),
        "data": where,
        "max_abs_diff": diff,
        "tolerance": tolerance,
    }
    sidecar = write_json(sidecar_path(out), spec)
    size = out.stat().st_size + (extra.stat().st_size if extra.exists() else 0)
    return ExportResult(out, sidecar, diff, len(reference), time.perf_counter() - started, size)


def read_routes(manifest: dict, where: Path) -> dict[str, list[tuple[str, str, float]]]:
    """Predict's routes of the manifest, every member checkpoint checked to exist (before torch loads).

    Raises:
        ExperimentError: a malformed ensemble entry, or a member whose checkpoint is gone.
    """
    from mura_tune.ensemble.predict import _checkpoint_path, ensemble_routes

    try:
        routes = ensemble_routes(manifest)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ExperimentError(
            f"{where}: malformed ensemble entry ({type(exc).__name__}: {exc})"
        ) from None
    for entries in routes.values():
        for trial_id, raw, _ in entries:
            _checkpoint_path(raw, trial_id, manifest, where)
    return routes


def check_format(format: str) -> None:
    """Refuse an unknown format, or one whose optional packages are not installed (one line)."""
    if format not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    missing = [name for name in NEEDS[format] if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"--format {format} needs {', '.join(missing)}: pip install 'mura-tune[export]'"
        )


# ------------------------------------------------------------------------------ the check
def check_images(
    manifest: dict, data: str | Path | None, n: int, seed: int
) -> tuple[pd.DataFrame, str]:
    """The images of up to ``n`` studies to check on, body parts taken in turn; and where they come from."""
    from mura_tune.ensemble.predict import read_images

    if data is not None:
        table, _ = read_images(data)
        where = str(data)
    else:
        split = Path(manifest.get("split_manifest") or Path(manifest["experiment"]) / SPLIT_FILE)
        if not split.is_file():
            raise ExperimentError(
                f"cannot check the export: the experiment's split {split} is gone "
                "(pass --data with studies to check on)"
            )
        table = pd.read_parquet(split)
        table = table[table["split"] == "val"]
        where = f"val studies of {split}"
    studies = table.drop_duplicates("study_id")[["study_id", "body_part"]]
    if studies.empty:
        raise ExperimentError(f"cannot check the export: no studies in {where}")
    rng = np.random.default_rng(seed)
    queues = [
        list(rng.permutation(group["study_id"].to_numpy()))
        for _, group in studies.groupby("body_part", sort=True)
    ]
    chosen: list[str] = []
    while len(chosen) < n and any(queues):
        chosen += [q.pop(0) for q in queues if q][: n - len(chosen)]
    images = table[table["study_id"].isin(chosen)]
    return images[["image_path", "study_id", "body_part", "label"]].reset_index(drop=True), where


def reference_probabilities(images: pd.DataFrame, members, keyed, engine) -> pd.DataFrame:
    """Predict's study probabilities of ``images`` (unreadable images skipped, as predict does)."""
    from mura_tune.ensemble.predict import _route_of, combine, image_probabilities

    route = _route_of(images["body_part"], keyed)
    probs, skipped = image_probabilities(images, members, route, engine, progress=False)
    ok = ~images["image_path"].isin({p for p, _ in skipped}).to_numpy()
    if not ok.any():
        raise ExperimentError("cannot check the export: none of the sampled images is readable")
    readable = images[ok].reset_index(drop=True)
    studies, _ = combine(readable, route[ok], keyed, {k: v[ok] for k, v in probs.items()})
    paths = readable.groupby("study_id", sort=False)["image_path"].agg(list)
    return studies.assign(image_paths=paths.reindex(studies["study_id"]).to_numpy())


def study_inputs(paths: list[str], sizes: list[int]) -> list[np.ndarray]:
    """The graph's image inputs for one study: per size, float32 ``(views, 1, S, S)`` in [0, 1].

    Unreadable images are left out (as predict leaves them out).
    """
    grays = []
    for path in paths:
        try:
            grays.append(load_gray(path))
        except ImageReadError:
            continue
    return [
        np.stack([letterbox(g, s) for g in grays])[:, None].astype(np.float32) / np.float32(255)
        for s in sizes
    ]


def compare(run, images, reference: pd.DataFrame, sizes: list[int], parts) -> float:
    """The largest absolute difference between ``run``'s study probabilities and predict's."""
    unknown = len(parts) - 1
    worst = 0.0
    for study in reference.itertuples():
        part = np.array([parts.index(study.body_part) if study.body_part in parts else unknown])
        got = run(part.astype(np.int64), study_inputs(study.image_paths, sizes))
        worst = max(worst, float(abs(float(got[0]) - float(study.prob))))
    return worst


# ------------------------------------------------------------------------------ writing
def write_model(graph, format: str, path: Path, spec: dict, external: Path) -> None:
    """Trace ``graph`` (float32, eval mode) into ``path`` as ONNX or TorchScript."""
    import torch

    size = graph.sizes
    example = (torch.zeros(1, dtype=torch.int64), *(torch.rand(2, 1, s, s) for s in size))
    with warnings.catch_warnings():  # the exporters' deprecation and tracing notes
        warnings.simplefilter("ignore")
        if format == "torchscript":
            traced = torch.jit.trace(graph, example, check_trace=False)
            torch.jit.save(traced, str(path), _extra_files={"mura_tune.json": json.dumps(spec)})
            return
        import onnx

        views = torch.export.Dim("views", min=1)
        program = torch.onnx.export(
            graph,
            example,
            dynamo=True,
            verbose=False,
            external_data=False,
            input_names=graph.input_names,
            output_names=[spec["output"]["name"]],
            dynamic_shapes=(None, tuple({0: views} for _ in size)),
        )
    model = program.model_proto
    meta = {
        "mura_tune.version": spec["mura_tune_version"],
        "mura_tune.ensemble": str(spec["ensemble"]["name"]),
        "mura_tune.body_parts": json.dumps(spec["body_parts"]),
        "mura_tune.thresholds": json.dumps(spec["thresholds"]),
        "mura_tune.preprocessing": json.dumps(spec["preprocessing"]),
    }
    onnx.helper.set_model_props(model, meta)
    model.doc_string = spec["output"]["meaning"]
    weights = sum(t.numel() * t.element_size() for t in graph.state_dict().values())
    if weights > ONNX_INLINE_LIMIT:
        onnx.save_model(model, str(path), save_as_external_data=True, location=external.name)
    else:
        onnx.save_model(model, str(path))


def load_runner(format: str, path: Path, input_names: list[str]):
    """``run(body_part, [images per size]) -> probability`` of the written model, in its own runtime."""
    if format == "torchscript":
        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(str(path))

        def run_torchscript(part, images):
            with torch.inference_mode():
                return module(torch.from_numpy(part), *map(torch.from_numpy, images)).numpy()

        return run_torchscript
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run_onnx(part, images):
        return session.run(None, dict(zip(input_names, [part, *images])))[0]

    return run_onnx
