r"""The smallest eigenvalue of a symmetric operator by the Lanczos method.

For a symmetric :math:`H` given by its products, ``m`` Lanczos steps from a unit
vector :math:`q_1` build an orthonormal basis :math:`Q_m` of the Krylov space
:math:`\mathcal K_m(H, q_1)` and the tridiagonal :math:`T_m = Q_m^\top H Q_m`:

.. math::

    \beta_{j+1} q_{j+1} = H q_j - \alpha_j q_j - \beta_j q_{j-1},
    \qquad \alpha_j = q_j^\top H q_j .

The smallest eigenvalue :math:`\theta` of :math:`T_m` (a Ritz value) is the
minimum of the Rayleigh quotient over :math:`\mathcal K_m`, so
:math:`\lambda_{\min}(H) \le \theta`, and it approaches :math:`\lambda_{\min}` far
faster than power iteration on a shifted operator (Chebyshev rather than
geometric convergence: on a spectrum spread evenly over :math:`[\mu, 100\mu]` in
200 dimensions, 20 steps overestimate :math:`\mu` 1.3 times where shifted power
iteration is 4.4 times off).  The Ritz vector :math:`Q_m s` of :math:`\theta` is
returned too: started from it, the next estimate at a nearby point continues where
this one stopped.

Reference: C. Lanczos, *An iteration method for the solution of the eigenvalue
problem of linear differential and integral operators*, J. Res. Nat. Bur.
Standards 45 (1950); G. H. Golub and C. F. Van Loan, *Matrix Computations*,
4th ed., ch. 10.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from .._tree import seeded_normal_like

_RANDOM_SHARE = 0.1
"""Weight of a random direction mixed into a warm start, so that the Krylov space
keeps every eigen-direction (a start that is an eigenvector would stop at once)."""


def lowest_eigenpair(
    matvec: Callable[[torch.Tensor], torch.Tensor], size: int, iterations: int, *,
    dtype: torch.dtype, device: torch.device, start: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> tuple[float, torch.Tensor]:
    r"""The smallest eigenvalue of the symmetric ``matvec`` on vectors of ``size``
    entries, and its Ritz vector, from ``iterations`` Lanczos steps.

    Args:
        matvec: ``v -> H v`` on flat vectors.
        size: the dimension of ``v``.
        iterations: Lanczos steps (products with ``H``); at most ``size`` are taken.
        dtype, device: of the vectors.
        start: a warm start (e.g. the Ritz vector of an earlier estimate); a random
            direction of weight 0.1 is mixed in.  ``None``: a random start.
        generator: a CPU generator for the random direction (reproducible estimates).

    Returns:
        ``(theta, u)``: the Ritz value, an upper bound on :math:`\lambda_{\min}(H)`,
        and the unit Ritz vector ``u`` (on ``device``).  Every basis vector is kept
        and reorthogonalized against (two matrix-vector products with the basis per
        step), and the only host read is of :math:`T_m` at the end; a Krylov space
        that closes early (an invariant subspace) ends the recurrence there.

    Raises:
        FloatingPointError: the products are not finite.
    """
    steps = max(1, min(int(iterations), int(size)))
    drawn = seeded_normal_like([torch.empty(size, dtype=dtype, device=device)],
                               generator if generator is not None else torch.Generator())[0]
    if start is not None:
        start = start.reshape(-1).to(device=device, dtype=dtype)
        drawn = start / start.norm().clamp_min(torch.finfo(dtype).tiny) + _RANDOM_SHARE * drawn / drawn.norm()
    basis = torch.zeros(steps + 1, size, dtype=dtype, device=device)
    basis[0] = drawn / drawn.norm().clamp_min(torch.finfo(dtype).tiny)
    alphas, betas = [], []
    for j in range(steps):
        w = matvec(basis[j])
        alpha = torch.dot(w, basis[j])
        for _ in range(2):  # full reorthogonalization, twice is enough (Kahan)
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta = w.norm()
        basis[j + 1] = w / beta.clamp_min(torch.finfo(dtype).tiny)
        alphas.append(alpha)
        betas.append(beta)
    numbers = np.asarray(torch.stack(alphas + betas).tolist(), dtype=np.float64)  # the one host read
    if not np.isfinite(numbers).all():
        raise FloatingPointError("the products of the Lanczos iteration are not finite.")
    alpha, beta = numbers[:steps], numbers[steps:]
    scale = max(np.abs(alpha).max(), beta.max())
    closed = np.flatnonzero(beta[:-1] <= 1e3 * torch.finfo(dtype).eps * scale)
    m = int(closed[0]) + 1 if len(closed) else steps  # the Krylov space closed after step m
    tridiagonal = np.diag(alpha[:m]) + np.diag(beta[: m - 1], 1) + np.diag(beta[: m - 1], -1)
    values, vectors = np.linalg.eigh(tridiagonal)
    weights = torch.as_tensor(vectors[:, 0], dtype=dtype).to(device=device, non_blocking=True)
    ritz = weights @ basis[:m]
    return float(values[0]), ritz / ritz.norm().clamp_min(torch.finfo(dtype).tiny)

__all__ = ["lowest_eigenpair"]
