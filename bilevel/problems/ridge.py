r"""Ridge regression with one regularization weight per feature.

.. math::

    \min_\lambda \tfrac12 \|X_{val} w^\star(\lambda) - t_{val}\|^2, \qquad
    w^\star(\lambda) = \arg\min_w \tfrac12 \|X w - t\|^2 + \tfrac12 \sum_j e^{\lambda_j} w_j^2
    = (X^\top X + \mathrm{diag}(e^\lambda))^{-1} X^\top t,

with the closed-form hypergradient
:math:`\nabla\Phi(\lambda) = -e^\lambda \odot w^\star \odot H^{-1} X_{val}^\top (X_{val} w^\star - t_{val})`.
The weights are log-scaled so that any real :math:`\lambda` is valid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .base import BilevelProblem, _builder

__all__ = ["RidgeHPO", "ridge", "ridge_diabetes"]


@dataclass
class RidgeHPO:
    r"""Per-feature ridge hyper-parameter problem with its closed forms.

    ``inner(lam, w)`` and ``outer(lam, w)`` take the upper variable first;
    :meth:`as_problem` bundles them into a :class:`BilevelProblem`.

    Attributes:
        X, t: training design ``(n, d)`` and targets ``(n,)``.
        X_val, t_val: validation design ``(n_val, d)`` and targets ``(n_val,)``.

    Example:
        With :math:`X = I` and :math:`\lambda = 0`, :math:`w^\star = (X^\top X + I)^{-1} X^\top t`:

        >>> import torch, bilevel
        >>> from bilevel.problems import RidgeHPO
        >>> X, t = torch.eye(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
        >>> hpo = RidgeHPO(X, t, X, t)
        >>> lam = torch.zeros(3, dtype=torch.float64)
        >>> hpo.solution(lam)
        tensor([0.5000, 0.5000, 0.5000], dtype=torch.float64)
        >>> g = bilevel.hypergrad(hpo.outer, hpo.inner, lam, hpo.solution(lam))
        >>> torch.allclose(g, hpo.hypergradient(lam))         # the closed form
        True
    """

    X: torch.Tensor
    t: torch.Tensor
    X_val: torch.Tensor
    t_val: torch.Tensor

    @property
    def num_features(self) -> int:
        return self.X.shape[1]

    def inner(self, lam: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((self.X @ w - self.t) ** 2).sum() + 0.5 * (lam.exp() * w**2).sum()

    def outer(self, lam: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((self.X_val @ w - self.t_val) ** 2).sum()

    def hessian(self, lam: torch.Tensor) -> torch.Tensor:
        return self.X.T @ self.X + torch.diag(lam.exp())

    def solution(self, lam: torch.Tensor) -> torch.Tensor:
        """The exact inner solution :math:`w^\\star(\\lambda)`."""
        return torch.linalg.solve(self.hessian(lam), self.X.T @ self.t)

    def hypergradient(self, lam: torch.Tensor) -> torch.Tensor:
        """The exact hypergradient :math:`\\nabla\\Phi(\\lambda)`."""
        w = self.solution(lam)
        v = torch.linalg.solve(self.hessian(lam), self.X_val.T @ (self.X_val @ w - self.t_val))
        return -lam.exp() * w * v

    def to(self, dtype: torch.dtype) -> "RidgeHPO":
        """The same problem with its data in ``dtype``."""
        return RidgeHPO(*(a.to(dtype) for a in (self.X, self.t, self.X_val, self.t_val)))

    def as_problem(self, lam0: Optional[torch.Tensor] = None, name: str = "ridge") -> BilevelProblem:
        """This problem as a :class:`BilevelProblem` (``x = lam``, ``y = w``).

        Args:
            lam0: start point of the log-penalties (default zeros), shape ``(d,)``.
            name: the problem's label.

        Returns:
            A :class:`BilevelProblem` starting at ``(lam0, 0)`` with no known
            optimum; ``data`` holds ``"hpo"`` (this object), the data tensors,
            and the closed forms ``"inner_solution"``, ``"hypergradient"`` and
            ``"hessian"`` (``lam -> inner Hessian``).
        """
        dtype = self.X.dtype
        lam0 = torch.zeros(self.num_features, dtype=dtype) if lam0 is None else lam0.to(dtype)
        problem = BilevelProblem(
            self.outer, self.inner, lam0, torch.zeros(self.num_features, dtype=dtype), name=name,
            data=dict(hpo=self, X=self.X, t=self.t, X_val=self.X_val, t_val=self.t_val,
                      inner_solution=self.solution, hypergradient=self.hypergradient,
                      hessian=self.hessian),
        )
        return _builder(problem, lambda dt: self.to(dt).as_problem(lam0.to(dt), name))


def ridge(
    n: int = 2000, d: int = 100, n_val: int = 1000, seed: int = 0, dtype: torch.dtype = torch.float64
) -> BilevelProblem:
    r"""Synthetic per-feature ridge HPO (the recipe of ``TARGETS.md``).

    .. math::

        X = Z \operatorname{diag}(s),\ Z_{ij} \sim \mathcal N(0, 1),\
        s = \operatorname{logspace}(0, -1, d), \qquad
        t = X w_{true} + 0.5\,\varepsilon,\ w_{true}, \varepsilon \sim \mathcal N(0, I),

    drawn from ``numpy.random.default_rng(seed)`` in the order ``Z`` (``n +
    n_val`` rows), ``w_true``, noise, then the start point
    :math:`\lambda_0 \sim \mathcal N(0, 0.5^2 I)`; the first ``n`` rows train,
    the last ``n_val`` validate.  Inner and outer are those of
    :class:`RidgeHPO`; the inner Hessian's condition number is about 108 at
    ``d = 100`` and 418 at ``d = 1000``.

    Args:
        n: training rows (default 2000).
        d: features = hyper-parameters (default 100).
        n_val: validation rows (default 1000).
        seed: seed of the numpy generator.
        dtype: floating dtype of the data.

    Returns:
        ``RidgeHPO(...).as_problem(lam0)``: ``x = lam`` (start
        :math:`\lambda_0`), ``y = w`` (start 0), closed-form inner solution and
        hypergradient in ``data``.

    Example:
        >>> p = ridge(n=50, d=5, n_val=20)
        >>> p.hypergradient(p.x0).shape
        torch.Size([5])

    References:
        Pedregosa, `Hyperparameter optimization with approximate gradient
        <https://arxiv.org/abs/1602.02355>`_, ICML 2016.
    """
    for value, label in ((n, "n"), (d, "d"), (n_val, "n_val")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{label}` must be a positive int; got {value!r}.")
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n + n_val, d)) * np.logspace(0, -1, d)
    w_true = rng.standard_normal(d)
    t = X @ w_true + 0.5 * rng.standard_normal(n + n_val)
    lam0 = 0.5 * rng.standard_normal(d)
    X, t, lam0 = (torch.as_tensor(a, dtype=dtype) for a in (X, t, lam0))
    hpo = RidgeHPO(X[:n], t[:n], X[n:], t[n:])
    return hpo.as_problem(lam0, name=f"ridge n={n} d={d}")


def ridge_diabetes(
    train_fraction: float = 0.67, seed: int = 0, dtype: torch.dtype = torch.float64
) -> RidgeHPO:
    """Per-feature ridge on scikit-learn's bundled diabetes data (442 x 10).

    Rows are shuffled with ``seed`` and split into training and validation
    sets; the target is centred on the training mean.  Needs ``scikit-learn``
    (``pip install bilevel[data]``).

    Args:
        train_fraction: share of the rows used for training, in ``(0, 1)``
            (default 0.67); the rest validate.
        seed: seed of the row shuffle (default 0).
        dtype: floating dtype of the data (default float64).

    Returns:
        A :class:`RidgeHPO` (10 log-penalties, one per feature); its
        :meth:`~RidgeHPO.as_problem` gives the :class:`BilevelProblem`.

    Raises:
        ImportError: scikit-learn is not installed.
        ValueError: ``train_fraction`` is not in ``(0, 1)``.

    Example:
        >>> from bilevel.problems import ridge_diabetes
        >>> hpo = ridge_diabetes()
        >>> hpo.X.shape, hpo.X_val.shape
        (torch.Size([296, 10]), torch.Size([146, 10]))
        >>> hpo.as_problem().x0.shape
        torch.Size([10])
    """
    try:
        from sklearn.datasets import load_diabetes
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("ridge_diabetes needs scikit-learn: pip install 'bilevel[data]'") from err
    if not 0 < train_fraction < 1:
        raise ValueError(f"`train_fraction` must be in (0, 1); got {train_fraction!r}.")
    X, t = load_diabetes(return_X_y=True)
    X = torch.as_tensor(X, dtype=dtype)
    t = torch.as_tensor(t, dtype=dtype)
    order = torch.randperm(len(t), generator=torch.Generator().manual_seed(seed))
    X, t = X[order], t[order]
    n_train = int(train_fraction * len(t))
    t = t - t[:n_train].mean()
    return RidgeHPO(X[:n_train], t[:n_train], X[n_train:], t[n_train:])
