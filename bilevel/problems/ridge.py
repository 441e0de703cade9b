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

import torch


@dataclass
class RidgeHPO:
    """Per-feature ridge hyper-parameter problem with its closed forms.

    ``inner(lam, w)`` and ``outer(lam, w)`` take the upper variable first.
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


def ridge_diabetes(
    train_fraction: float = 0.67, seed: int = 0, dtype: torch.dtype = torch.float64
) -> RidgeHPO:
    """Per-feature ridge on scikit-learn's bundled diabetes data (442 x 10).

    Rows are shuffled with ``seed`` and split into training and validation
    sets; the target is centred on the training mean.  Needs ``scikit-learn``
    (``pip install bilevel[data]``).
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
