r"""Classification problems on scikit-learn's bundled data sets (no download).

* :func:`logistic_breast_cancer` — logistic regression with one L2 weight per
  feature (log scale) on the Wisconsin breast-cancer data (569 x 30).
* :func:`hyper_cleaning_digits` — data hyper-cleaning (Franceschi et al., 2017)
  on the 8x8 digits (1797 x 64, 10 classes): learn one weight per training
  example so that the corrupted labels stop mattering.

Both need ``scikit-learn`` (``pip install 'bilevel[data]'``).  The inner
problems are strongly convex in ``y``; mini-batches are index tensors passed as
the optional third argument (``inner(x, y, idx)``: rows of the training set,
``outer(x, y, idx)``: rows of the validation set).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .base import BilevelProblem, _builder

__all__ = ["logistic_breast_cancer", "hyper_cleaning_digits"]


def _sklearn(loader: str):
    try:
        import sklearn.datasets as datasets
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"{loader} needs scikit-learn: pip install 'bilevel[data]'") from err
    return getattr(datasets, loader)


def _split(n: int, sizes: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint train / validation / test row indices from one permutation."""
    order = np.random.default_rng(seed).permutation(n)
    a, b = sizes
    return order[:a], order[a : a + b], order[a + b :]


def _standardize(X: np.ndarray, train: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(X - mean) / std`` with the training rows' statistics (constant columns keep std 1)."""
    mean = X[train].mean(axis=0)
    std = X[train].std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    return (X - mean) / std, mean, std


def _sizes(n: int, train_fraction: float, val_fraction: float) -> tuple[int, int]:
    if not (0 < train_fraction and 0 < val_fraction and train_fraction + val_fraction < 1):
        raise ValueError(
            "`train_fraction` and `val_fraction` must be positive with a sum below 1 (the rest is "
            f"the test split); got {train_fraction!r} and {val_fraction!r}."
        )
    return int(round(train_fraction * n)), int(round(val_fraction * n))


def logistic_breast_cancer(
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    train_fraction: float = 0.5,
    val_fraction: float = 0.25,
) -> BilevelProblem:
    r"""Per-feature L2 hyper-parameters of logistic regression on the breast-cancer data.

    .. math::

        f(\lambda, w) = \sum_{i \in \text{train}} \operatorname{softplus}(-t_i (a_i^\top w_{1:d} + w_{d+1}))
            + \tfrac12 \sum_{j=1}^d e^{\lambda_j} w_j^2, \qquad
        F(\lambda, w) = \frac{1}{n_{val}} \sum_{i \in \text{val}}
            \operatorname{softplus}(-t_i (a_i^\top w_{1:d} + w_{d+1})),

    with labels :math:`t_i = \pm 1` (+1 benign), features :math:`a_i`
    standardized with the training rows' mean and standard deviation, and an
    unpenalized bias :math:`w_{d+1}`.  :math:`f` is strongly convex in
    :math:`w` for every :math:`\lambda`.

    Args:
        seed: seed of the row permutation that makes the splits.
        dtype: floating dtype of the data.
        train_fraction: share of the 569 rows used for training (default 0.5).
        val_fraction: share used for validation (default 0.25); the rest is the
            test split.

    Returns:
        A :class:`BilevelProblem` with ``x = lam`` (30 log-penalties, start 0)
        and ``y = w`` (31 entries, start 0), no known optimum.  ``data`` holds
        ``X_train, t_train, X_val, t_val, X_test, t_test``, ``indices`` (rows of
        the original data per split), ``mean`` / ``std`` (the standardization),
        ``feature_names`` and ``accuracy(w, split="test")``.

    Example:
        >>> p = logistic_breast_cancer()
        >>> p.data["X_train"].shape, p.x0.shape, p.y0.shape
        (torch.Size([284, 30]), torch.Size([30]), torch.Size([31]))

    References:
        Pedregosa, `Hyperparameter optimization with approximate gradient
        <https://arxiv.org/abs/1602.02355>`_, ICML 2016; Lorraine, Vicol,
        Duvenaud, `Optimizing millions of hyperparameters by implicit
        differentiation <https://arxiv.org/abs/1911.02590>`_, AISTATS 2020.
    """
    bunch = _sklearn("load_breast_cancer")()
    n = len(bunch.target)
    train, val, test = _split(n, _sizes(n, train_fraction, val_fraction), seed)
    X, mean, std = _standardize(np.asarray(bunch.data, dtype=np.float64), train)
    t = 2.0 * np.asarray(bunch.target, dtype=np.float64) - 1.0
    as_t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=dtype)  # noqa: E731
    splits = {name: (as_t(X[idx]), as_t(t[idx])) for name, idx in (("train", train), ("val", val), ("test", test))}
    (Xtr, ttr), (Xva, tva) = splits["train"], splits["val"]
    d = X.shape[1]

    def _margins(w, A, labels):
        return labels * (A @ w[:-1] + w[-1])

    def inner(lam, w, batch: Optional[torch.Tensor] = None):
        A, labels, scale = (Xtr, ttr, 1.0) if batch is None else (Xtr[batch], ttr[batch], len(ttr) / len(batch))
        return scale * F.softplus(-_margins(w, A, labels)).sum() + 0.5 * (lam.exp() * w[:-1] ** 2).sum()

    def outer(lam, w, batch: Optional[torch.Tensor] = None):
        A, labels = (Xva, tva) if batch is None else (Xva[batch], tva[batch])
        return F.softplus(-_margins(w, A, labels)).mean()

    def accuracy(w: torch.Tensor, split: str = "test") -> float:
        """Share of rows of ``split`` ("train", "val" or "test") classified right by ``w``."""
        if split not in splits:
            raise ValueError(f"`split` must be 'train', 'val' or 'test'; got {split!r}.")
        A, labels = splits[split]
        with torch.no_grad():
            return float((_margins(w.to(A), A, labels) > 0).to(A.dtype).mean())

    data = dict(
        X_train=Xtr, t_train=ttr, X_val=Xva, t_val=tva, X_test=splits["test"][0], t_test=splits["test"][1],
        indices=dict(train=torch.as_tensor(train), val=torch.as_tensor(val), test=torch.as_tensor(test)),
        mean=as_t(mean), std=as_t(std), feature_names=list(bunch.feature_names), accuracy=accuracy,
    )
    problem = BilevelProblem(
        outer, inner, torch.zeros(d, dtype=dtype), torch.zeros(d + 1, dtype=dtype),
        name="logistic_breast_cancer", data=data,
    )
    return _builder(problem, lambda dt: logistic_breast_cancer(seed, dt, train_fraction, val_fraction))


def hyper_cleaning_digits(
    corruption: float = 0.5,
    n_train: int = 600,
    n_val: int = 600,
    seed: int = 0,
    l2: float = 1e-3,
    dtype: torch.dtype = torch.float64,
) -> BilevelProblem:
    r"""Data hyper-cleaning on the digits data: learn which training labels to trust.

    A share ``corruption`` of the training labels is replaced by a uniformly
    drawn *wrong* label.  With one logit :math:`x_i` per training example and a
    linear softmax classifier :math:`y = (W, b)`:

    .. math::

        f(x, y) = \frac{1}{n} \sum_{i=1}^{n} \sigma(x_i)\,
            \operatorname{CE}(W a_i + b, \tilde c_i) + \frac{\mu}{2}(\|W\|^2 + \|b\|^2), \qquad
        F(x, y) = \frac{1}{n_{val}} \sum_{i \in \text{val}} \operatorname{CE}(W a_i + b, c_i),

    with :math:`\tilde c` the corrupted training labels, :math:`c` the clean
    validation labels, :math:`\sigma` the logistic function and :math:`\mu`
    ``= l2``: :math:`f` is :math:`\mu`-strongly convex in :math:`y`.  Pixels
    are standardized with the training rows' statistics.  A good :math:`x`
    gives the corrupted examples weight near 0.

    Args:
        corruption: share of training labels replaced by a wrong one, in
            ``[0, 1]`` (default 0.5).
        n_train: training rows (default 600).
        n_val: validation rows (default 600); the remaining rows of the 1797
            are the test split.
        seed: seed of the split and of the corruption.
        l2: :math:`\mu > 0`, the L2 weight on ``W`` and ``b`` (default 1e-3).
        dtype: floating dtype of the data.

    Returns:
        A :class:`BilevelProblem` with ``x`` of shape ``(n_train,)`` (start 0,
        i.e. every weight 1/2) and ``y = {"weight": (10, 64), "bias": (10,)}``
        (start 0; usable with ``torch.func.functional_call`` on
        ``nn.Linear(64, 10)``).  ``data`` holds ``X_train``, ``labels_train``
        (corrupted), ``labels_train_clean``, ``corrupted`` (bool mask),
        ``X_val, labels_val, X_test, labels_test``, ``indices``,
        ``accuracy(y, split="test")`` and ``cleaning_f1(x)`` (F1 score of
        flagging corrupted examples by :math:`\sigma(x_i) < 1/2`).

    Example:
        >>> p = hyper_cleaning_digits()
        >>> int(p.data["corrupted"].sum()), p.y0["weight"].shape
        (300, torch.Size([10, 64]))

    References:
        Franceschi, Donini, Frasconi, Pontil, `Forward and reverse gradient-based
        hyperparameter optimization <https://arxiv.org/abs/1703.01785>`_, ICML
        2017 (data hyper-cleaning); Shaban, Cheng, Hatch, Boots, `Truncated
        back-propagation for bilevel optimization
        <https://arxiv.org/abs/1810.10667>`_, AISTATS 2019.
    """
    if not 0 <= corruption <= 1:
        raise ValueError(f"`corruption` must be in [0, 1]; got {corruption!r}.")
    if not l2 > 0:
        raise ValueError(f"`l2` must be positive (it makes the inner problem strongly convex); got {l2!r}.")
    bunch = _sklearn("load_digits")()
    n, classes = len(bunch.target), 10
    for value, label in ((n_train, "n_train"), (n_val, "n_val")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{label}` must be a positive int; got {value!r}.")
    if n_train + n_val >= n:
        raise ValueError(f"`n_train + n_val` must be below {n} (the rest is the test split); got {n_train + n_val}.")
    train, val, test = _split(n, (n_train, n_val), seed)
    X, _, _ = _standardize(np.asarray(bunch.data, dtype=np.float64), train)
    labels = np.asarray(bunch.target, dtype=np.int64)
    rng = np.random.default_rng([seed, 1])
    clean = labels[train]
    noisy = clean.copy()
    flipped = rng.permutation(n_train)[: int(round(corruption * n_train))]
    noisy[flipped] = (clean[flipped] + rng.integers(1, classes, size=len(flipped))) % classes
    mask = np.zeros(n_train, dtype=bool)
    mask[flipped] = True

    as_t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=dtype)  # noqa: E731
    as_l = lambda a: torch.as_tensor(np.ascontiguousarray(a))  # noqa: E731
    splits = {"train": (as_t(X[train]), as_l(clean)), "val": (as_t(X[val]), as_l(labels[val])),
              "test": (as_t(X[test]), as_l(labels[test]))}
    Xtr, ytr = splits["train"][0], as_l(noisy)
    Xva, yva = splits["val"]
    corrupted = torch.as_tensor(mask)

    def _logits(y, A):
        return A @ y["weight"].T + y["bias"]

    def inner(x, y, batch: Optional[torch.Tensor] = None):
        A, c, w = (Xtr, ytr, torch.sigmoid(x)) if batch is None else (Xtr[batch], ytr[batch], torch.sigmoid(x[batch]))
        ce = F.cross_entropy(_logits(y, A), c, reduction="none")
        return (w * ce).mean() + 0.5 * l2 * ((y["weight"] ** 2).sum() + (y["bias"] ** 2).sum())

    def outer(x, y, batch: Optional[torch.Tensor] = None):
        A, c = (Xva, yva) if batch is None else (Xva[batch], yva[batch])
        return F.cross_entropy(_logits(y, A), c)

    def accuracy(y, split: str = "test") -> float:
        """Share of rows of ``split`` ("train" with clean labels, "val" or "test") classified right."""
        if split not in splits:
            raise ValueError(f"`split` must be 'train', 'val' or 'test'; got {split!r}.")
        A, c = splits[split]
        with torch.no_grad():
            return float((_logits(y, A).argmax(-1) == c).to(A.dtype).mean())

    def cleaning_f1(x: torch.Tensor) -> float:
        """F1 score of flagging example i as corrupted when sigmoid(x_i) < 1/2."""
        flagged = (x < 0).cpu()
        tp = float((flagged & corrupted).sum())
        denominator = float(flagged.sum()) + float(corrupted.sum())
        return 2 * tp / denominator if denominator else 1.0

    data = dict(
        X_train=Xtr, labels_train=ytr, labels_train_clean=splits["train"][1], corrupted=corrupted,
        X_val=Xva, labels_val=yva, X_test=splits["test"][0], labels_test=splits["test"][1],
        indices=dict(train=torch.as_tensor(train), val=torch.as_tensor(val), test=torch.as_tensor(test)),
        num_classes=classes, l2=l2, accuracy=accuracy, cleaning_f1=cleaning_f1,
    )
    d = X.shape[1]
    y0 = {"weight": torch.zeros(classes, d, dtype=dtype), "bias": torch.zeros(classes, dtype=dtype)}
    problem = BilevelProblem(
        outer, inner, torch.zeros(n_train, dtype=dtype), y0,
        name=f"hyper_cleaning_digits corruption={corruption}", data=data,
    )
    return _builder(problem, lambda dt: hyper_cleaning_digits(corruption, n_train, n_val, seed, l2, dt))
