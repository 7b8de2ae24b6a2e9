"""Names shared by the trainer, searcher, scheduler, leaderboard and ensemble (defined once)."""

from __future__ import annotations

VERSION = "0.1.0"

#: The metric every component optimises, and its direction.
METRIC = "val_kappa_study"
MODE = "max"
#: A trial reports to the scheduler and the searcher, as METRIC, the val study kappa of the
#: checkpoint it keeps so far (its best epoch): ASHA compares at each rung, and TPE learns from,
#: what each trial would deliver, not one epoch's swing. The epoch's own value goes under
#: EPOCH_METRIC; a training run records the kept value under KEPT_METRIC.
KEPT_METRIC = f"kept_{METRIC}"
EPOCH_METRIC = f"epoch_{METRIC}"
#: The scheduler's time attribute: the epoch our trainable reports. (Ray's own
#: training_iteration restarts at 1 when a trial resumes from our resume.pt.)
TIME_ATTR = "epoch"

BODY_PARTS = (
    "XR_ELBOW",
    "XR_FINGER",
    "XR_FOREARM",
    "XR_HAND",
    "XR_HUMERUS",
    "XR_SHOULDER",
    "XR_WRIST",
)

#: What a training run reports on val each epoch (:func:`mura_tune.metrics.split_metrics`): the
#: names ``select_metric`` may pick the best checkpoint by (``*_loss`` minimised, others maximised).
VAL_METRICS = tuple(
    f"val_{m}"
    for m in ("kappa_study", "auc", "loss", "kappa_image", "accuracy", "sensitivity", "specificity")
) + tuple(f"val_{m}_{part}" for m in ("kappa_study", "auc") for part in BODY_PARTS)

#: ``select_metric`` of a run that keeps its last epoch (the epoch number only grows): a
#: cross-validated refit's fold models, which select nothing on their held-out fold.
LAST_EPOCH = "epoch"
#: What ``select_metric`` may name.
SELECT_METRICS = (*VAL_METRICS, LAST_EPOCH)

#: The official release's folder name, and its two source splits (``valid`` becomes our test).
MURA_ROOT = "MURA-v1.1"
SOURCE_SPLITS = ("train", "valid")

#: Columns of the canonical image table (one row per image).
TABLE_COLUMNS = ("image_path", "study_id", "patient_id", "body_part", "label", "source_split")
SPLITS = ("train", "val", "test")

#: ImageNet statistics (the radiograph is replicated to 3 channels, as the MURA paper did).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
