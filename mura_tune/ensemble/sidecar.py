"""The sidecar of an exported model (``OUT.json``): what a user without mura-tune needs to run it.

It names the inputs and the output with their shapes and meaning, the body-part index, the decision
thresholds (the manifest's fitted ``thresholds`` per part, else 0.5), the routes and members, and
every preprocessing step (:data:`PREPROCESSING`, the rules of :mod:`mura_tune.data.images` and of
the input normalisation), precisely enough to reproduce the input tensor with NumPy and Pillow
alone. The ONNX model carries the body parts, thresholds and preprocessing in its metadata too.
"""

from __future__ import annotations

from pathlib import Path

from mura_tune.constants import IMAGENET_MEAN, IMAGENET_STD, VERSION
from mura_tune.data.images import MAX_PIXELS
from mura_tune.errors import ExperimentError

#: The MURA protocol's decision threshold, where the manifest has none fitted.
DEFAULT_THRESHOLD = 0.5
#: The graph's inputs and output (an ``images_<S>`` input per member image size).
BODY_PART_INPUT = "body_part"
OUTPUT = "probability"
#: The last body-part index: a study whose part is not one the ensemble knows.
UNKNOWN_PART = "unknown"


def images_input(size: int) -> str:
    """The name of the graph input holding the views letterboxed to ``size`` px."""
    return f"images_{size}"


def sidecar_path(model: Path) -> Path:
    """``OUT.json`` beside the model ``OUT``."""
    return model.with_name(model.name + ".json")


def describe(manifest: dict, graph, table, members, format: str, out: Path) -> dict:
    """The sidecar: inputs, output, body-part index, thresholds, members and every preprocessing step."""
    inputs = [
        {
            "name": BODY_PART_INPUT,
            "dtype": "int64",
            "shape": [1],
            "meaning": "index of the study's body part in body_parts; any other value counts as unknown",
        }
    ] + [
        {
            "name": name,
            "dtype": "float32",
            "shape": ["views", 1, s, s],
            "image_size": s,
            "meaning": f"the study's readable views, each preprocessed at {s} px (see preprocessing); "
            "every images_* input holds the same views in the same order",
        }
        for name, s in zip(graph.input_names[1:], graph.sizes)
    ]
    return {
        "format": format,
        "model": out.name,
        "mura_tune_version": VERSION,
        "ensemble": {"name": manifest.get("name"), "experiment": manifest.get("experiment")},
        "inputs": inputs,
        "output": {
            "name": OUTPUT,
            "dtype": "float32",
            "shape": [1],
            "meaning": "the study's probability of being abnormal, as `mura-tune predict` computes "
            "it; the study is abnormal when it exceeds its body part's threshold",
        },
        "body_parts": list(table.parts),
        "thresholds": part_thresholds(manifest, table.parts),
        "routing": {part: table.routes[r] for part, r in zip(table.parts, table.route_of_part)},
        "routes": {
            route: {m.trial_id: w for m, w in zip(members, table.weights[i]) if w}
            for i, route in enumerate(table.routes)
        },
        "members": [
            {
                "trial_id": m.trial_id,
                "checkpoint": str(m.checkpoint),
                "image_size": m.image_size,
                "tta_flip": bool(m.tta_flip),
            }
            for m in members
        ],  # fmt: skip
        "preprocessing": PREPROCESSING,
    }


def part_thresholds(manifest: dict, parts) -> dict[str, float]:
    """The decision threshold of every body part: the manifest's fitted ``thresholds``, else 0.5."""
    fitted = manifest.get("thresholds") or {}
    try:
        return {part: float(fitted.get(part, DEFAULT_THRESHOLD)) for part in parts}
    except (AttributeError, TypeError, ValueError):
        raise ExperimentError(
            f"manifest thresholds must map body parts to numbers, got {fitted!r}"
        ) from None


#: How one view becomes one slice of an ``images_<S>`` input (mura_tune.data.images, augment).
PREPROCESSING = {
    "steps": [
        "decode the PNG (other formats are not read)",
        "convert to 8-bit grayscale (rules in grayscale)",
        "letterbox: zero-pad to a centred square (rules in letterbox)",
        "resize the square to S x S (rules in resize), unless its side is already S",
        "scale: float32 value / 255, giving [0, 1]",
        "stack the study's views as (views, 1, S, S), one array per images_<S> input",
        "inside the graph: replicate to 3 channels, subtract mean and divide by std per channel, "
        "run every member, average each member's image probabilities over the views",
    ],
    "decode": {
        "format": "PNG",
        "max_pixels": MAX_PIXELS,
        "unreadable": "an empty, truncated, non-PNG or larger image is skipped; a study with no "
        "readable view gets no prediction",
    },
    "grayscale": {
        "L": "8-bit grayscale: used as it is",
        "I;16, I;16B, I;16L, I": "16- or 32-bit: value * (255 / the image's maximum), rounded half "
        "to even, clipped to [0, 255] (an all-zero image stays zero)",
        "P": "palette: expanded to RGBA first, then as RGBA",
        "RGB, RGBA": "luma (ITU-R 601-2) in Pillow's fixed point: (R * 19595 + G * 38470 + "
        "B * 7471 + 32768) >> 16 (see luma); alpha is dropped",
        "other": "Pillow's Image.convert('L')",
    },
    "luma": {"weights": [19595, 38470, 7471], "offset": 32768, "shift": 16},
    "letterbox": {
        "side": "max(height, width)",
        "pad_value": 0,
        "top": "(side - height) // 2",
        "left": "(side - width) // 2",
    },
    "resize": {
        "method": "bilinear",
        "call": "PIL.Image.fromarray(square).resize((S, S), PIL.Image.Resampling.BILINEAR, "
        "reducing_gap=None)",
        "note": "Pillow's bilinear filter widens with the shrink factor (antialiased) and rounds "
        "to uint8; OpenCV's INTER_LINEAR does not widen and gives other pixels",
    },
    "scale": {"dtype": "float32", "divide_by": 255.0, "range": [0.0, 1.0]},
    "in_graph": {
        "channels": "the 1 channel is replicated to 3",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "normalise": "(x - mean[c]) / std[c] for channel c",
        "view_mean": "each member's image probabilities are averaged over the study's views",
    },
}
