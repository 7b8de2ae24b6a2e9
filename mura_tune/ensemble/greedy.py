"""Greedy ensemble selection (Caruana et al. 2004) as a small estimator.

Forward selection *with replacement* over candidate models' study-level validation
probabilities: the ensemble's study probability is the weighted mean of its members', and a
study is abnormal when that mean is above 0.5 (the MURA rule). Compared with auto-sklearn's
``EnsembleSelection`` this version

* starts from the best ``N`` single models (sorted initialisation, ``N`` chosen on val);
* breaks ties (frequent: kappa is discrete) by preferring a model already in the ensemble
  (as AutoGluon does), then the lower log-loss of the resulting ensemble, then one seeded
  random order fixed at the start;
* keeps the best prefix of the trajectory, not the last step;
* caps the number of distinct members (``max_members``: AutoGluon's maintainers see no gain
  past about 25-40), after which only models already chosen can be added again;
* scores every candidate at once per step (numpy over a ``(candidates, studies)`` matrix).

:class:`BaggedEnsemble` is Caruana et al.'s bagged selection: the same greedy selection on random
subsets ("bags") of the candidates, the bags' weights averaged; auto-sklearn has no working
version of it (its bagging path raises).

Example::

    ens = GreedyEnsemble(max_size=25, metric="kappa").fit(val_probs, val_labels, names)
    test_probs = ens.predict_proba(test_probs_matrix)
    bagged = BaggedEnsemble(n_bags=20, bag_fraction=0.5).fit(val_probs, val_labels, names)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata

from mura_tune.errors import ConfigError, check_int
from mura_tune.metrics import THRESHOLD, kappa_from_counts

METRICS = ("kappa", "auc", "logloss")
_EPS = 1e-7
_TIE = 1e-12  # scores within this of the best count as tied


def check_metric(metric: str) -> str:
    """Return ``metric`` if it is a known selection metric, else raise ConfigError."""
    if metric not in METRICS:
        raise ConfigError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    return metric


def maximise(metric: str) -> bool:
    """Whether a larger value of ``metric`` is better (log-loss is minimised)."""
    return check_metric(metric) != "logloss"


def batch_scores(
    probs: np.ndarray, base: np.ndarray, k: np.ndarray | float, labels: np.ndarray, metric: str
) -> np.ndarray:
    """Score many candidate ensembles at once.

    The ensemble of row ``i`` has study probabilities ``(base + probs[i]) / k``.

    Args:
        probs: ``(B, S)`` probabilities of the model added in each row.
        base: ``(S,)`` or ``(B, S)`` sum of the probabilities already in the ensemble.
        k: ensemble size after the addition (scalar, or ``(B, 1)``).
        labels: ``(S,)`` 0/1 labels.
        metric: ``"kappa"``, ``"auc"`` or ``"logloss"``.

    Returns:
        ``(B,)`` scores in the metric's own direction (AUC is ``nan`` with one class).
    """
    y = np.asarray(labels, dtype=bool)
    k = np.asarray(k, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    # Positives first (as ``fit`` arranges them) lets slices replace copying boolean masks.
    pos, neg = (slice(0, n_pos), slice(n_pos, None)) if not y[n_pos:].any() else (y, ~y)
    if metric == "kappa":
        pred = probs > (THRESHOLD * k - base)  # mean > 0.5, without building the mean
        tp = np.count_nonzero(pred[..., pos], axis=-1)
        fp = np.count_nonzero(pred[..., neg], axis=-1)
        return kappa_from_counts(tp, fp, n_pos - tp, n_neg - fp)
    mean = np.add(probs, base)
    mean /= k
    if metric == "logloss":
        np.clip(mean, _EPS, 1 - _EPS, out=mean)
        mean[..., neg] = 1.0 - mean[..., neg]
        np.log(mean, out=mean)
        return -mean.sum(-1) / max(y.size, 1)
    if n_pos == 0 or n_neg == 0:
        return np.full(mean.shape[:-1], np.nan)
    ranks = rankdata(mean, axis=-1)
    return (ranks[..., pos].sum(-1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def score(labels: np.ndarray, probs: np.ndarray, metric: str = "kappa") -> float:
    """One ensemble's (or model's) score on study probabilities, as selection computes it."""
    p = np.asarray(probs, dtype=np.float64)[None, :]
    return float(batch_scores(p, np.zeros(p.shape[1]), 1.0, labels, check_metric(metric))[0])


class GreedyEnsemble:
    """Greedy forward selection with replacement, sorted initialisation and best-prefix pruning.

    Args:
        max_size: number of selection steps (ensemble size, counting repeats) to run.
        metric: ``"kappa"`` (study Cohen's kappa), ``"auc"`` or ``"logloss"`` (minimised).
        n_init: fixed size of the sorted initialisation; ``None`` chooses it on val.
        max_init: largest initialisation size tried when ``n_init`` is ``None``.
        prune_top: keep only the best ``prune_top`` single models as candidates.
        max_members: most distinct candidates in the ensemble (``None``: no cap beyond ``max_size``).
        seed: seeds the random order that breaks full ties.

    Attributes (after ``fit``):
        weights_: ``(n_candidates,)`` weights summing to 1 (0 for unused candidates).
        members_: candidate indices in the order added, with repeats, truncated to ``best_size_``.
        trajectory_: one dict per step: ``size``, ``score``, ``logloss``, ``added``, ``name``, ``phase``.
        best_size_: ensemble size of the first step that reached the best score.
        score_: the best score (on the data given to ``fit``).
        n_init_: size of the sorted initialisation used.
        candidate_scores_: ``(n_candidates,)`` single-model scores.
        names_: candidate names.
    """

    def __init__(
        self,
        max_size: int = 25,
        metric: str = "kappa",
        n_init: int | None = None,
        max_init: int = 5,
        prune_top: int | None = None,
        max_members: int | None = None,
        seed: int = 0,
    ) -> None:
        check_int("max_size", max_size, 1)
        check_int("max_init", max_init, 1)
        if n_init is not None:
            check_int("n_init", n_init, 1)
            if n_init > max_size:
                raise ConfigError(
                    f"n_init must be <= max_size, got n_init={n_init}, max_size={max_size}"
                )
        if prune_top is not None:
            check_int("prune_top", prune_top, 1)
        if max_members is not None:
            check_int("max_members", max_members, 1)
        check_int("seed", seed, 0)
        self.max_size = max_size
        self.metric = check_metric(metric)
        self.n_init = n_init
        self.max_init = max_init
        self.prune_top = prune_top
        self.max_members = max_members
        self.seed = seed

    # ------------------------------------------------------------------ fit
    def fit(
        self, probs: np.ndarray, labels: np.ndarray, names: Sequence[str] | None = None
    ) -> GreedyEnsemble:
        """Select the ensemble on validation studies.

        Args:
            probs: ``(n_candidates, n_studies)`` study-level validation probabilities.
            labels: ``(n_studies,)`` 0/1 study labels.
            names: optional candidate names (default ``"0"``, ``"1"``, ...).

        Returns:
            self.

        Raises:
            ConfigError: on malformed arrays or settings that do not fit the data.
        """
        P, y = self._check_inputs(probs, labels)
        by_label = np.argsort(~y, kind="stable")  # positives first: scoring uses slices
        P, y = P[:, by_label], y[by_label]
        n_cand, n_studies = P.shape
        if names is None:
            names = [str(i) for i in range(n_cand)]
        if len(names) != n_cand:
            raise ConfigError(
                f"names must have one entry per candidate ({n_cand}), got {len(names)}"
            )
        self.names_ = [str(n) for n in names]
        self.n_candidates_ = n_cand
        sign = 1.0 if maximise(self.metric) else -1.0
        # One seeded order breaks full ties; position in it is the last tie-breaker.
        order_rank = np.argsort(np.random.default_rng(self.seed).permutation(n_cand))

        zeros = np.zeros(n_studies)
        self.candidate_scores_ = batch_scores(P, zeros, 1.0, y, self.metric)
        single_gain = np.nan_to_num(sign * self.candidate_scores_, nan=-np.inf)
        single_ll = batch_scores(P, zeros, 1.0, y, "logloss")
        ranking = np.lexsort((order_rank, single_ll, -single_gain))  # best single model first
        keep = ranking if self.prune_top is None else ranking[: self.prune_top]
        self.candidates_kept_ = np.sort(keep)

        members, trajectory = self._initialise(P, y, ranking[: len(keep)], sign)
        total = P[members].sum(0)
        Pk = P[keep]
        in_ens = np.zeros(n_cand, dtype=bool)
        in_ens[members] = True
        while len(members) < self.max_size:
            k = len(members) + 1
            gain = np.nan_to_num(sign * batch_scores(Pk, total, k, y, self.metric), nan=-np.inf)
            if self.max_members is not None and in_ens.sum() >= self.max_members:
                gain[~in_ens[keep]] = -np.inf  # full: only a model already chosen may be added
            tied = np.flatnonzero(gain >= gain.max() - _TIE)
            chosen_tied = tied[in_ens[keep[tied]]]
            if chosen_tied.size:  # prefer a model already in the ensemble
                tied = chosen_tied
            if tied.size > 1:  # then the lower log-loss of the resulting ensemble
                ll = batch_scores(Pk[tied], total, k, y, "logloss")
                tied = tied[ll <= ll.min() + _TIE]
            pick = int(keep[tied[np.argmin(order_rank[keep[tied]])]])
            members.append(pick)
            in_ens[pick] = True
            total = total + P[pick]
            trajectory.append(self._step(k, sign * gain[tied[0]], total, y, pick, "greedy"))

        gains = np.array([sign * t["score"] for t in trajectory])
        best = int(np.flatnonzero(gains >= gains.max() - _TIE)[0])  # first size reaching the best
        self.trajectory_ = trajectory
        self.best_size_ = trajectory[best]["size"]
        self.score_ = trajectory[best]["score"]
        self.members_ = members[: self.best_size_]
        counts = np.bincount(self.members_, minlength=n_cand)
        self.weights_ = counts / counts.sum()
        return self

    def _initialise(
        self, P: np.ndarray, y: np.ndarray, ranked: np.ndarray, sign: float
    ) -> tuple[list[int], list[dict]]:
        """Sorted initialisation: the best ``N`` single models, ``N`` fixed or chosen on val."""
        if self.n_init is not None:
            if self.n_init > ranked.size:
                raise ConfigError(
                    f"n_init must be <= the number of candidates ({ranked.size}), got {self.n_init}"
                )
            top = self.n_init
        else:
            top = min(self.max_init, ranked.size, self.max_size, self.max_members or ranked.size)
        prefix = np.cumsum(P[ranked[:top]], axis=0)  # row j: sum of the best j+1 models
        sizes = np.arange(1, top + 1, dtype=np.float64)[:, None]
        scores = batch_scores(np.zeros_like(prefix), prefix, sizes, y, self.metric)
        if self.n_init is None:
            gains = np.nan_to_num(sign * scores, nan=-np.inf)
            n = int(np.flatnonzero(gains >= gains.max() - _TIE)[0]) + 1
        else:
            n = self.n_init
        self.n_init_ = n
        members = [int(i) for i in ranked[:n]]
        trajectory = [
            self._step(j + 1, float(scores[j]), prefix[j], y, members[j], "init") for j in range(n)
        ]
        return members, trajectory

    def _step(
        self, size: int, value: float, total: np.ndarray, y: np.ndarray, added: int, phase: str
    ) -> dict:
        logloss = float(batch_scores(total[None, :] / size, np.zeros(y.size), 1.0, y, "logloss")[0])
        return {
            "size": int(size),
            "score": float(value),
            "logloss": logloss,
            "added": int(added),
            "name": self.names_[added],
            "phase": phase,
        }

    # -------------------------------------------------------------- predict
    def predict_proba(self, probs: np.ndarray) -> np.ndarray:
        """Weighted mean of the candidates' study probabilities.

        Args:
            probs: ``(n_candidates, n_studies)`` probabilities, candidates in the ``fit`` order.

        Returns:
            ``(n_studies,)`` ensemble probabilities.

        Raises:
            ConfigError: if not fitted or ``probs`` has the wrong number of candidates.
        """
        if not hasattr(self, "weights_"):
            raise ConfigError("GreedyEnsemble.predict_proba called before fit")
        P = np.asarray(probs, dtype=np.float64)
        if P.ndim != 2 or P.shape[0] != self.n_candidates_:
            raise ConfigError(
                f"probs must have shape (n_candidates={self.n_candidates_}, n_studies), got {P.shape}"
            )
        used = self.weights_ > 0
        return self.weights_[used] @ P[used]

    def _check_inputs(self, probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        P = np.asarray(probs, dtype=np.float64)
        y = np.asarray(labels)
        if P.ndim != 2 or P.shape[0] < 1 or P.shape[1] < 1:
            raise ConfigError(
                f"probs must be a non-empty (n_candidates, n_studies) array, got shape {P.shape}"
            )
        if y.shape != (P.shape[1],):
            raise ConfigError(
                f"labels must have shape ({P.shape[1]},) to match probs, got {y.shape}"
            )
        if not np.isin(y, (0, 1)).all():
            raise ConfigError(f"labels must be 0 or 1, got values {np.unique(y)[:5].tolist()}")
        bad = ~np.isfinite(P) | (P < 0) | (P > 1)
        if bad.any():
            c, s = np.argwhere(bad)[0]
            raise ConfigError(
                f"probs must be finite and in [0, 1], got {P[c, s]!r} (candidate {c}, study {s})"
            )
        if self.metric == "auc" and np.unique(y).size < 2:
            raise ConfigError(
                "metric 'auc' needs both classes among the labels, got one class only"
            )
        return P, y.astype(bool)


class BaggedEnsemble(GreedyEnsemble):
    """Bagged ensemble selection (Caruana et al. 2004, section 4.3).

    Greedy selection runs on ``n_bags`` random subsets of the candidates (each holds
    ``bag_fraction`` of them, drawn without replacement from one seeded generator); the ensemble's
    weights are the mean of the bags' weights. A bag cannot lean on the few models that happen
    to fit the selection set best, so the average overfits it less. With more distinct members
    than ``max_members``, the heaviest ``max_members`` are kept and their weights renormalised.

    Args:
        n_bags: number of bags (>= 1).
        bag_fraction: share of the candidates in each bag, in (0, 1] (at least one candidate).
        **settings: the :class:`GreedyEnsemble` settings each bag's selection uses.

    Attributes (after ``fit``), besides ``weights_``, ``score_``, ``candidate_scores_``, ``names_``:
        bags_: one dict per bag: ``candidates`` (indices), ``members`` (indices chosen, with
            repeats), ``score`` (the bag ensemble's score).
        members_: the candidates with a weight, heaviest first; ``best_size_`` their count.
        trajectory_: empty (each bag has its own selection; see ``bags_``).
    """

    def __init__(self, n_bags: int = 20, bag_fraction: float = 0.5, **settings) -> None:
        super().__init__(**settings)
        check_int("n_bags", n_bags, 1)
        if not 0.0 < bag_fraction <= 1.0:
            raise ConfigError(f"bag_fraction must be in (0, 1], got {bag_fraction!r}")
        self.n_bags = n_bags
        self.bag_fraction = bag_fraction

    def fit(
        self, probs: np.ndarray, labels: np.ndarray, names: Sequence[str] | None = None
    ) -> BaggedEnsemble:
        """Select one ensemble per bag on the given studies and average their weights.

        Args, Returns and Raises: as :meth:`GreedyEnsemble.fit`.
        """
        P, y = self._check_inputs(probs, labels)
        n_cand = P.shape[0]
        names = [str(i) for i in range(n_cand)] if names is None else [str(n) for n in names]
        if len(names) != n_cand:
            raise ConfigError(
                f"names must have one entry per candidate ({n_cand}), got {len(names)}"
            )
        settings = {
            "max_size": self.max_size,
            "metric": self.metric,
            "max_init": self.max_init,
            "prune_top": self.prune_top,
            "max_members": self.max_members,
            "seed": self.seed,
        }
        size = max(1, int(round(self.bag_fraction * n_cand)))
        rng = np.random.default_rng(self.seed)
        weights = np.zeros(n_cand)
        self.bags_ = []
        for _ in range(self.n_bags):
            bag = np.sort(rng.choice(n_cand, size=size, replace=False))
            ens = GreedyEnsemble(**settings).fit(P[bag], y, [names[i] for i in bag])
            weights[bag] += ens.weights_ / self.n_bags
            members = [int(bag[j]) for j in ens.members_]
            self.bags_.append({"candidates": bag.tolist(), "members": members, "score": ens.score_})
        order = np.lexsort((np.arange(n_cand), -weights))  # heaviest first, ties by index
        if self.max_members is not None:
            weights[order[self.max_members :]] = 0.0
        self.weights_ = weights / weights.sum()
        self.members_ = [int(i) for i in order if self.weights_[i] > 0]
        self.best_size_ = len(self.members_)
        self.names_ = names
        self.n_candidates_ = n_cand
        self.n_init_ = 0
        self.trajectory_ = []
        zeros = np.zeros(y.size)
        self.candidate_scores_ = batch_scores(P, zeros, 1.0, y, self.metric)
        self.score_ = score(y, self.weights_ @ P, self.metric)
        return self
