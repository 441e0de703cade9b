r"""The linear algebra of the batched interior-point QP: its inequality rows and Newton systems.

Every iteration of :func:`~bilevel.layers.qp_solve` solves, for each element of the batch,

.. math::

    \begin{pmatrix} H & A^\top \\ A & 0 \end{pmatrix}
    \begin{pmatrix} \Delta z \\ \Delta\nu \end{pmatrix} = \begin{pmatrix} r_z \\ r_\nu \end{pmatrix},
    \qquad H = Q + G^\top \operatorname{diag}(d)\, G,\quad d = \lambda / s > 0.

Formed densely and factorized by LU (order ``n + p``), as OptNet's solver does, this costs
:math:`O(m n^2)` to form ``H`` and :math:`O((n + p)^3)` to factorize, every iteration.  Two
structures make it cheaper here:

* **bound rows**: a row of ``G`` with a single nonzero (:math:`z_j \le u`, :math:`-z_j \le -l`,
  :math:`z \ge 0`) adds :math:`g^2 d` to one diagonal entry of ``H``.  :class:`Rows` keeps such
  rows as (column, coefficient) pairs, so that :math:`Gz`, :math:`G^\top\lambda` and their share
  of ``H`` cost :math:`O(m)`; the other rows stay dense.
* **the Schur complement**: ``H`` is positive semi-definite (``Q`` is), so :class:`NewtonSystem`
  factorizes ``H`` by Cholesky (order ``n``) and :math:`S = A H^{-1} A^\top` by Cholesky (order
  ``p``) instead of the indefinite saddle matrix by LU.  With a diagonal ``Q`` and bound rows only
  (projections onto the simplex, a box, the non-negative orthant) ``H`` is diagonal and a
  factorization costs :math:`O(n p^2 + p^3)`.

Near the end of a run the entries of ``d`` span :math:`\mu` to :math:`1/\mu`; where ``H`` or ``S``
is singular or nearly so (an LP with ties, a variable without curvature or bound, dependent
rows of ``A``) the factorization is regularized and the solve refined
(:class:`NewtonSystem`).
"""

from __future__ import annotations

import math

import torch

from ..implicit.linear_solve._base import _sync_every


def shared(t: torch.Tensor) -> bool:
    """Whether ``t`` is one tensor expanded along its batch dimension (stride 0), as
    :func:`~bilevel.layers.qp_solve` holds an input that all problems share."""
    return t.dim() > 0 and t.shape[0] > 1 and t.stride(0) == 0


def first(t: torch.Tensor) -> torch.Tensor:
    """``t``, or its one distinct element (batch dimension of size 1) where :func:`shared`."""
    return t[:1] if shared(t) else t


def mv(M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Batched matrix-vector product ``M @ v`` (``(B, r, c)`` times ``(B, c)``); one
    matrix-matrix product where ``M`` is :func:`shared`."""
    if shared(M):
        return v @ M[0].mT
    return (M @ v.unsqueeze(-1)).squeeze(-1)


def max_abs(M: torch.Tensor) -> torch.Tensor:
    """``max |M|`` per batch element (``(B,)``; 0 where ``M`` has no entries)."""
    flat = first(M).reshape(first(M).shape[0], -1)
    out = flat.abs().amax(-1) if flat.shape[-1] else flat.new_zeros(flat.shape[0])
    return out.expand(M.shape[0])


def scale_rows(M: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``M / r[..., None]`` (rows of ``(B, k, n)`` divided by ``(B, k)``), shared where ``M`` and
    ``r`` are."""
    if shared(M) and shared(r):
        return (M[:1] / r[:1].unsqueeze(-1)).expand(M.shape)
    return M / r.unsqueeze(-1)


def row_sizes(M: torch.Tensor) -> torch.Tensor:
    """``max_j |M_ij|`` per row (``(B, k)``; 0 for an empty row), shared where ``M`` is."""
    top = first(M)
    out = top.abs().amax(-1) if top.shape[-1] else top.new_zeros(top.shape[:-1])
    return out.expand(M.shape[:-1])


class Quadratic:
    """The matrix ``Q`` of a batch of QPs, kept as its diagonal ``(B, n)`` where every ``Q``
    is diagonal (a projection: ``Q = I``), else dense ``(B, n, n)``."""

    def __init__(self, Q: torch.Tensor, diagonal: bool):
        self.diagonal = Q.diagonal(dim1=-2, dim2=-1) if diagonal else None
        self.dense = None if diagonal else Q
        self.augmented = None

    def augment(self, A: torch.Tensor) -> None:
        r"""Keep :math:`Q + A^\top A` for the Newton systems (:class:`NewtonSystem`): with
        :math:`A \Delta z = r_\nu`, :math:`(H + A^\top A) \Delta z + A^\top \Delta\nu = r_z +
        A^\top r_\nu` has the same solution, and its ``H`` is positive definite wherever
        the curvature reaches a variable through the equalities only.  CVXPY's forms are
        like that (``sum_squares(x - y)`` becomes ``t = x - y`` with the curvature on ``t``);
        without it their ``H`` is singular up to the multipliers of the inactive bounds, and
        the Schur complement of the late iterations lost the dual residual."""
        top = first(A)
        gram = (top.mT @ top).expand(A.shape[:1] + top.shape[-1:] * 2)
        self.augmented = gram + (torch.diag_embed(self.diagonal) if self.dense is None else self.dense)

    def mv(self, z: torch.Tensor) -> torch.Tensor:
        """:math:`Q z`."""
        return self.diagonal * z if self.dense is None else mv(self.dense, z)

    def size(self) -> torch.Tensor:
        """``max |Q_ij|`` per element."""
        return max_abs(self.diagonal) if self.dense is None else max_abs(self.dense)

    def scaled(self, c: torch.Tensor) -> "Quadratic":
        """``Q / c`` (``c`` of shape ``(B,)``)."""
        out = Quadratic.__new__(Quadratic)
        out.diagonal = None if self.diagonal is None else self.diagonal / c.unsqueeze(-1)
        out.dense = None if self.dense is None else self.dense / c[:, None, None]
        out.augmented = None
        return out


def inf_norm(x: torch.Tensor) -> torch.Tensor:
    """``max |x|`` over the last dimension (0 where it is empty)."""
    return x.abs().amax(-1) if x.shape[-1] else torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)


def on_host(x: torch.Tensor) -> bool:
    """Whether reading a flag of ``x`` on the host is free (the CPU): elsewhere the
    solver avoids the read and does the work for all elements, as the linear solvers do."""
    return _sync_every(x) == 1


def structure(Q: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, int, bool, int]:
    """The layout of a batch of QPs, read once (one host read): the permutation of the
    rows of ``G`` that puts its bound rows first (rows with one nonzero column, the same
    for every element), their number, whether every ``Q`` is diagonal, and ``k > 0``
    where every variable has ``k`` bound rows (``z >= 0``: 1; a box: 2), which the
    permutation then orders as ``k`` tiles of the ``n`` columns in order."""
    m, n = G.shape[-2:]
    G, Q = first(G), first(Q)
    pattern = (G != 0).any(0) if G.shape[0] else torch.zeros(G.shape[1:], dtype=torch.bool, device=G.device)
    bound = pattern.sum(-1) == 1
    column = pattern.to(torch.int8).argmax(-1)
    diagonal = (Q == torch.diag_embed(Q.diagonal(dim1=-2, dim2=-1))).all()
    flags = torch.cat([bound, diagonal.reshape(1), column]).tolist()
    rows = [i for i in range(m) if flags[i]]
    columns = flags[m + 1:]
    keys, count = [], {}  # a bound row's tile: how many bound rows of its column came before it
    for i in rows:
        j = columns[i]
        keys.append((count.get(j, 0), j, i))
        count[j] = count.get(j, 0) + 1
    k = len(rows) // n if n else 0
    if k and len(count) == n and all(c == k for c in count.values()):
        rows = [i for _, _, i in sorted(keys)]
    else:
        k = 0
    perm = torch.tensor(rows + [i for i in range(m) if not flags[i]], dtype=torch.int64, device=G.device)
    return perm, len(rows), bool(flags[m]), k


class Rows:
    r"""The inequality rows of a batch of QPs, :math:`G = \begin{pmatrix} G_b \\ G_g\end{pmatrix}`:
    ``mb`` bound rows first, row ``i`` with coefficient ``coef[:, i]`` in column ``cols[i]``,
    then the general rows ``dense`` (``(B, m - mb, n)``).

    Args:
        G: ``(B, m, n)``, its bound rows first (:func:`structure` gives the order).
        mb: the number of bound rows.
        tiles: ``k > 0`` where the bound rows are ``k`` tiles of the columns in order
            (``mb = k n``): the products are then reshapes, not gathers and scatters.
    """

    def __init__(self, G: torch.Tensor, mb: int = 0, tiles: int = 0):
        B, m, n = G.shape
        self.mb, self.n, self.tiles = mb, n, tiles
        self.cols = (first(G)[:, :mb] != 0).any(0).to(torch.int8).argmax(-1) if mb else None
        self.coef = G[:, :mb].gather(-1, self.cols.expand(B, mb).unsqueeze(-1)).squeeze(-1) if mb else None
        self.dense = G[:, mb:] if m > mb else None
        self.empty = G.new_zeros(B, 0) if m == 0 else None
        self.size = max_abs(G)  # max |G_ij| per element

    def mv(self, z: torch.Tensor) -> torch.Tensor:
        """:math:`G z`, ``(B, m)``."""
        parts = []
        if self.tiles:
            parts.append((self.coef.view(-1, self.tiles, self.n) * z.unsqueeze(1)).view(-1, self.mb))
        elif self.mb:
            parts.append(self.coef * z[:, self.cols])
        if self.dense is not None:
            parts.append(mv(self.dense, z))
        if not parts:
            return self.empty
        return parts[0] if len(parts) == 1 else torch.cat(parts, -1)

    def rmv(self, v: torch.Tensor) -> torch.Tensor:
        r""":math:`G^\top v`, ``(B, n)``."""
        out = mv(self.dense.mT, v[:, self.mb:]) if self.dense is not None else None
        if self.mb:
            bound = self._sum_columns(self.coef * v[:, :self.mb])
            return bound if out is None else out + bound
        return v.new_zeros(v.shape[0], self.n) if out is None else out

    def _sum_columns(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, mb)`` values of the bound rows summed into their columns, ``(B, n)``."""
        if self.tiles:
            return x.view(-1, self.tiles, self.n).sum(1)
        return x.new_zeros(x.shape[0], self.n).index_add(1, self.cols, x)

    def gram(self, d: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        r""":math:`G^\top \operatorname{diag}(d) G` as its diagonal part from the bound rows
        (``(B, n)``) and its dense part from the general rows (``(B, n, n)``); ``None`` for
        an absent part."""
        diagonal = dense = None
        if self.mb:
            diagonal = self._sum_columns(self.coef ** 2 * d[:, :self.mb])
        if self.dense is not None:
            dense = self.dense.mT @ (self.dense * d[:, self.mb:].unsqueeze(-1))
        return diagonal, dense


def _cholesky_solve(U: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``(U^T U)^-1 r`` for ``r`` of shape ``(B, n)`` or ``(B, n, k)``, by two triangular
    solves: a third of the time of ``torch.cholesky_solve``, which copies the factor."""
    column = r.dim() == 2
    x = r.unsqueeze(-1) if column else r
    x = torch.linalg.solve_triangular(U, torch.linalg.solve_triangular(U.mT, x, upper=False), upper=True)
    return x.squeeze(-1) if column else x


class NewtonSystem:
    r"""Factorization of :math:`M = \begin{pmatrix} H & A^\top \\ A & 0\end{pmatrix}`,
    :math:`H = Q + G^\top \operatorname{diag}(d) G` (module docstring), for a batch.

    ``H`` is factorized by Cholesky (or divided by, when it is diagonal), then the Schur
    complement :math:`S = A H^{-1} A^\top` by Cholesky; a solve is
    :math:`\Delta\nu = S^{-1}(A H^{-1} r_z - r_\nu)`, :math:`\Delta z = H^{-1}(r_z - A^\top
    \Delta\nu)`.  An element whose ``H`` (or ``S``) is singular or nearly so (a squared
    Cholesky pivot of ``H`` below :math:`(n + p)\,\varepsilon` times its diagonal entry, of
    ``S`` below that times the largest; a zero diagonal of a diagonal ``H``) is factorized
    again shifted, :math:`H + \delta_p I` (:math:`S + \delta_d
    I`), which is the quasi-definite :math:`\begin{pmatrix} H + \delta_p I & A^\top \\ A &
    -\delta_d I\end{pmatrix}`, and its solves take one step of iterative refinement against
    the unshifted ``M``.  Each shift is sized for the block it protects, in that block's
    units (the data are equilibrated to unit size): :math:`\delta_d = \sqrt{\varepsilon}`
    keeps the multipliers of dependent (consistent) rows of ``A`` bounded, and
    :math:`\delta_p = \sqrt{\varepsilon} + (n + p)\,\varepsilon \max|H|` stays above the
    rounding error of forming ``H``, whose entries grow like ``1/mu``: along a direction
    where ``H`` has no curvature left after rounding (the optimal face of an LP with ties)
    ``H`` is exactly singular otherwise.  Where the true curvature is larger the shifts
    change a step by a relative :math:`\delta / \text{curvature}`, which the refinement
    squares; along the (nearly) singular directions the step is the regularized (proximal)
    one, which stays on the optimal face.  A shift of :math:`\sqrt{\varepsilon}\max|M|` on
    both blocks grew to 1e6..4e9 near the end of a run, where the steps then stopped
    reducing the residuals.  An element that cannot be factorized even shifted (``Q`` not
    positive semi-definite) gets a NaN step.

    Args:
        Q: the quadratic term.
        rows: the inequality rows :math:`G`.
        d: ``(B, m)``, the weights of the rows.
        A: ``(B, p, n)``.
    """

    def __init__(self, Q: Quadratic, rows: Rows, d: torch.Tensor, A: torch.Tensor):
        n, p = rows.n, A.shape[-2]
        eps = torch.finfo(d.dtype).eps
        self.A, self.p = A, p
        bound, dense = rows.gram(d)
        accelerator = not on_host(d)
        self.augmented = False
        if Q.dense is None and dense is None:
            h = Q.diagonal
            h = h if bound is None else h + bound
            self.diagonal, self.h = True, h
            flag_h = ~((h > 0).all(-1) & torch.isfinite(h).all(-1))
            scale = torch.where(torch.isfinite(h), h.abs(), 0).amax(-1)
        else:
            if Q.augmented is not None:
                H = Q.augmented
            else:
                H = torch.diag_embed(Q.diagonal) if Q.dense is None else Q.dense
            H = H + dense if dense is not None else H.expand(d.shape[:1] + H.shape[1:]).clone()
            if bound is not None:
                H.diagonal(dim1=-2, dim2=-1).add_(bound)
            # A pivot is judged against its own diagonal entry: near the end those span 1/mu
            # to mu, and against the largest pivot every late iteration was flagged and
            # factorized twice.  (An H singular where the KKT matrix is not, as in CVXPY's
            # forms, is made definite by Quadratic.augment beforehand.)
            self.H, self.diagonal, self.augmented = H, False, Q.augmented is not None
            self.U, info = torch.linalg.cholesky_ex(H, upper=True)
            diagonal = H.diagonal(dim1=-2, dim2=-1)
            pivots = self.U.diagonal(dim1=-2, dim2=-1) ** 2
            flag_h = (info > 0) | ~torch.isfinite(pivots).all(-1) | (pivots <= (n + p) * eps * diagonal).any(-1)
            scale = diagonal.abs().amax(-1)  # max |H_ij| (H is positive semi-definite)
        self.refine = None
        broken = torch.zeros_like(flag_h)
        if accelerator or bool(flag_h.any()):  # a zero shift leaves the other elements' factors as they were
            shift = torch.where(flag_h, math.sqrt(eps) + (n + p) * eps * scale, 0).unsqueeze(-1)
            if self.diagonal:
                self.h_shifted = self.h + shift
                broken = ~(self.h_shifted > 0).all(-1)  # a negative diagonal: Q is not positive semi-definite
            else:
                shifted = self.H.clone()
                shifted.diagonal(dim1=-2, dim2=-1).add_(shift)
                self.U, info = torch.linalg.cholesky_ex(shifted, upper=True)
                broken = info > 0
            self.refine = flag_h
        elif self.diagonal:
            self.h_shifted = self.h
        if p:
            self.W = self._h_solve(A.mT)                       # H^-1 A^T, (B, n, p)
            S = A @ self.W
            self.Us, info = torch.linalg.cholesky_ex(S, upper=True)
            # S = A H^-1 A^T carries H's rounding error, eps cond(H) relative: its pivots are
            # judged against that (with cond(H) estimated from H's pivots), or a singular S
            # (dependent rows of A; more active constraints than variables) whose rounding
            # pivot landed just above eps slipped through unshifted and the element stalled
            if self.diagonal:
                spread = self.h_shifted.amax(-1) / self.h_shifted.amin(-1).clamp_min(torch.finfo(S.dtype).tiny)
            else:
                pivots = self.U.diagonal(dim1=-2, dim2=-1) ** 2
                spread = pivots.amax(-1) / pivots.amin(-1).clamp_min(torch.finfo(S.dtype).tiny)
            flag_s = self._flag(self.Us, info, n + p, eps * spread.clamp_min(1))
            if accelerator or bool(flag_s.any()):
                size = S.diagonal(dim1=-2, dim2=-1).amax(-1)  # S is positive semi-definite
                tiny = torch.finfo(S.dtype).tiny
                shift = torch.where(flag_s, math.sqrt(eps) + (n + p) * eps * size + tiny, 0).unsqueeze(-1).expand(-1, p)
                self.Us, info = torch.linalg.cholesky_ex(S + torch.diag_embed(shift), upper=True)
                broken = broken | (info > 0)
                self.refine = flag_s if self.refine is None else self.refine | flag_s
        self.broken = broken.unsqueeze(-1)

    @staticmethod
    def _flag(L: torch.Tensor, info: torch.Tensor, order: int, eps) -> torch.Tensor:
        """Elements whose Cholesky factor failed or has a pivot below ``order * eps`` times the
        largest (for the Schur complement)."""
        pivots = L.diagonal(dim1=-2, dim2=-1) ** 2
        finite = torch.isfinite(pivots).all(-1)
        return (info > 0) | ~finite | (pivots.amin(-1) <= order * eps * pivots.amax(-1))

    def _h_solve(self, r: torch.Tensor) -> torch.Tensor:
        """``(H + shift)^-1 r`` for ``r`` of shape ``(B, n)`` or ``(B, n, k)``."""
        if self.diagonal:
            return r / (self.h_shifted if r.dim() == 2 else self.h_shifted.unsqueeze(-1))
        return _cholesky_solve(self.U, r)

    def _shifted_solve(self, rz: torch.Tensor, ry: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = self._h_solve(rz)
        if not self.p:
            return u, ry
        dy = _cholesky_solve(self.Us, mv(self.A, u) - ry)
        return u - mv(self.W, dy), dy

    def solve(self, rz: torch.Tensor, ry: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dz, dy)`` with ``M (dz, dy) = (rz, ry)``, per element of the batch."""
        if self.augmented:  # H holds Q + A^T A (Quadratic.augment)
            rz = rz + mv(self.A.mT, ry)
        dz, dy = self._shifted_solve(rz, ry)
        if self.refine is not None:  # one step of iterative refinement against the unshifted M
            Hz = self.h * dz if self.diagonal else mv(self.H, dz)
            ez, ey = rz - Hz - mv(self.A.mT, dy), ry - mv(self.A, dz)
            cz, cy = self._shifted_solve(ez, ey)
            mask = self.refine.unsqueeze(-1)
            dz, dy = torch.where(mask, dz + cz, dz), torch.where(mask, dy + cy, dy)
        return torch.where(self.broken, math.nan, dz), torch.where(self.broken, math.nan, dy)
