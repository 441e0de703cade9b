r"""Elimination of the auxiliary variables that CVXPY's canonical forms define by equalities.

CVXPY writes ``sum_squares(M @ z - c)`` as :math:`\|t\|^2` with a new variable ``t`` and the
equality :math:`t - M z = -c`; a projection ``sum_squares(x - y)`` as :math:`\|t\|^2` with
:math:`t - x = -y`.  Solved as given, the QP has ``n + m`` variables and ``m`` more equality
rows, and all its curvature sits on ``t``: the simplex projection of 200 coordinates became
a QP of 400 variables and 201 equalities, ten times the work of the direct form.

A variable :math:`x_j` that appears in a single constraint, an equality row ``r`` with a
coefficient :math:`a` that no parameter changes, is a function of the others:
:math:`x_j = (b_r - A_{r,K} x_K) / a`.  With ``E`` the variables so eliminated (each from its
own row) and ``K`` the rest, :math:`x_E = T x_K + t_0` with :math:`T = -A_{R,K} / a`,
:math:`t_0 = b_R / a`, and the QP becomes

.. math::

    P' = P_{KK} + P_{KE} T + T^\top P_{EK} + T^\top P_{EE} T, \quad
    c' = c_K + T^\top (c_E + P_{EE} t_0) + P_{KE} t_0,

with the other equality rows and the inequalities restricted to ``K`` (neither involves
``E``).  Every step is a torch operation on the data, so gradients w.r.t. the parameters
flow through it; the minimizer is the same, and :math:`x_E` is recovered from :math:`x_K`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ._qp_kkt import first, mv, shared


@dataclass(frozen=True)
class Elimination:
    """Which variables are eliminated, from which equality rows (:func:`find_elimination`)."""

    rows: torch.Tensor          # pivot equality rows R
    eliminated: torch.Tensor    # their variables E (one per row)
    kept: torch.Tensor          # the other variables K
    other_rows: torch.Tensor    # the equality rows that stay
    diagonal: bool              # P_EE is diagonal and P_KE is zero (CVXPY's sum_squares)

    def reduce(self, P, c, A, b, G, h):
        """The QP in ``x_K`` (module docstring) from the full data, and ``(T, t0)`` to
        recover ``x_E``."""
        E, K, R, S = (i.to(c.device) for i in (self.eliminated, self.kept, self.rows, self.other_rows))
        block = lambda M, rows, cols: M[:, rows.unsqueeze(-1), cols]  # noqa: E731
        blocks = dict(P_KK=block(P, K, K), c_K=c[:, K], c_E=c[:, E], A_RK=block(A, R, K), a=A[:, R, E],
                      b_R=b[:, R], A_SK=block(A, S, K), b_S=b[:, S], G_K=G[:, :, K], h=h)
        if self.diagonal:
            blocks.update(p_EE=P[:, E, E])
        else:
            blocks.update(P_EE=block(P, E, E), P_KE=block(P, K, E))
        return reduced_qp(**blocks)

    def block_maps(self, c_map, ab, p_map, n: int, m: int, zero: int) -> dict:
        """The rows of the sparse maps (scipy, as :func:`find_elimination` takes them) that
        give each block :func:`reduced_qp` needs, for ``diagonal`` eliminations: the data
        are then computed block by block, never as the full ``P`` and ``[A | b]`` (and
        their gradients never pass through those).  Signs and layouts as the layer's
        forward: ``A = -ab[..., :-1]``, ``b = ab[..., -1]``, column-major."""
        E, K, R, S = (i.numpy() for i in (self.eliminated, self.kept, self.rows, self.other_rows))
        at = lambda rows, cols: (cols[None, :] * m + rows[:, None]).reshape(-1)  # noqa: E731
        inequalities = np.arange(zero, m)
        out = {
            "c_K": c_map[K], "c_E": c_map[E],
            "A_RK": -ab[at(R, K)], "a": -ab[E * m + R], "b_R": ab[n * m + R],
            "A_SK": -ab[at(S, K)], "b_S": ab[n * m + S],
            "G_K": -ab[at(inequalities, K)], "h": ab[n * m + inequalities],
        }
        if p_map is not None:
            out["P_KK"], out["p_EE"] = p_map[(K[:, None] * n + K[None, :]).reshape(-1)], p_map[E * n + E]
        return out

    def blocks_from(self, maps: dict, values: torch.Tensor, apply, constant: set) -> tuple:
        """:func:`reduced_qp` on the blocks computed by ``apply(map, values)`` from the
        maps of :meth:`block_maps` (torch sparse), for the batch ``values``.  A block that
        no parameter changes (named in ``constant``) is computed once and shared by the
        batch (an expanded tensor, which the QP solver keeps as one)."""
        nE, nK, nS = self.eliminated.numel(), self.kept.numel(), self.other_rows.numel()
        B = values.shape[0]

        def get(name, *shape):
            if name in constant:  # no gradient either: nothing in it depends on the parameters
                return apply(maps[name], values[:1].detach()).reshape(1, *shape).expand(B, *shape)
            return apply(maps[name], values).reshape(B, *shape)

        # the blocks' map rows are in row-major order (block_maps); P_KK is symmetrized like P
        blocks = dict(c_K=get("c_K", nK), c_E=get("c_E", nE), A_RK=get("A_RK", nE, nK), a=get("a", nE),
                      b_R=get("b_R", nE), A_SK=get("A_SK", nS, nK), b_S=get("b_S", nS),
                      G_K=get("G_K", maps["h"].shape[0], nK), h=get("h", maps["h"].shape[0]))
        if "P_KK" in maps:
            P_KK = get("P_KK", nK, nK)
            top = first(P_KK)  # symmetrized once where the batch shares it
            blocks.update(P_KK=(0.5 * (top + top.mT)).expand(P_KK.shape), p_EE=get("p_EE", nE))
        else:  # an LP
            blocks.update(P_KK=values.new_zeros(1, nK, nK).expand(B, nK, nK), p_EE=values.new_zeros(1, nE).expand(B, nE))
        return reduced_qp(**blocks)

    def recover(self, x_K: torch.Tensor, T: torch.Tensor, t0: torch.Tensor, n: int) -> torch.Tensor:
        """The full ``x`` from the reduced problem's solution."""
        x_E = mv(T, x_K) + t0
        x = x_K.new_zeros(x_K.shape[0], n)
        return x.index_copy(1, self.kept.to(x.device), x_K).index_copy(1, self.eliminated.to(x.device), x_E)


def reduced_qp(P_KK, c_K, c_E, A_RK, a, b_R, A_SK, b_S, G_K, h, p_EE=None, P_EE=None, P_KE=None):
    """The QP in ``x_K`` (module docstring) from the blocks of the full one (``p_EE``: the
    diagonal of ``P_EE`` where ``P_KE = 0``); returns its data and ``(T, t0)``."""
    if shared(A_RK) and shared(a):  # one T for the whole batch: computed once
        T = (-first(A_RK) / first(a).unsqueeze(-1)).expand(A_RK.shape)
    else:
        T = -A_RK / a.unsqueeze(-1)                                    # (B, nE, nK)
    t0 = b_R / a
    if p_EE is not None:
        if all(shared(t) for t in (P_KK, T, p_EE)):  # the same P' for the whole batch: computed once
            P_red = (first(P_KK) + first(T).mT @ (first(p_EE).unsqueeze(-1) * first(T))).expand(P_KK.shape)
        else:
            P_red = P_KK + T.mT @ (p_EE.unsqueeze(-1) * T)
        c_red = c_K + mv(T.mT, c_E + p_EE * t0)
    else:
        cross = P_KE @ T
        P_red = P_KK + cross + cross.mT + T.mT @ P_EE @ T
        c_red = (c_K + (T.mT @ (c_E + (P_EE @ t0.unsqueeze(-1)).squeeze(-1)).unsqueeze(-1)).squeeze(-1)
                 + (P_KE @ t0.unsqueeze(-1)).squeeze(-1))
    return (P_red, c_red, A_SK, b_S, G_K, h), (T, t0)


def find_elimination(ab, p_map, n: int, m: int, zero: int, constant_column: int) -> Elimination | None:
    """The variables CVXPY's form defines by equalities, from the sparsity of the maps.

    Args:
        ab: sparse map from the parameter values to ``[A | b]`` flattened column-major
            (``(m, n + 1)``), CVXPY's sign (``A x + s = b`` with ``-A`` stored).
        p_map: sparse map to ``P`` flattened (``(n, n)``), or None for an LP.
        n, m: variables and constraint rows; ``zero``: the first ``zero`` rows are equalities.
        constant_column: the column of ``ab`` fed the constant 1.

    Returns:
        None where nothing can be eliminated.
    """
    ab = ab.tocsr()
    entries = np.diff(ab.indptr)                                   # nonzeros per map row
    fed = np.diff(ab[:, :constant_column].tocsr().indptr)          # ... of them from parameters
    shape = (n + 1, m)                                             # map row = column * m + row
    present = (entries.reshape(shape).T)[:, :n] > 0                # (m, n): may A[i, j] be nonzero
    constant = (fed.reshape(shape).T)[:, :n] == 0
    value = np.asarray(ab[:, constant_column].todense()).reshape(shape).T[:, :n]
    rows, eliminated, used = [], [], set()
    for j in range(n):
        where = np.flatnonzero(present[:, j])
        if where.size != 1 or where[0] >= zero:
            continue
        r = int(where[0])
        if r in used or not constant[r, j] or value[r, j] == 0:
            continue
        used.add(r)
        rows.append(r)
        eliminated.append(j)
    if not eliminated or len(eliminated) == n:
        return None
    E = np.array(eliminated)
    kept = np.setdiff1d(np.arange(n), E)
    diagonal = True
    if p_map is not None:
        p_present = (np.diff(p_map.tocsr().indptr) > 0).reshape(n, n)
        block = p_present[np.ix_(E, E)]
        diagonal = not (block & ~np.eye(E.size, dtype=bool)).any() and not p_present[np.ix_(kept, E)].any()
    as_index = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64))  # noqa: E731
    return Elimination(as_index(rows), as_index(E), as_index(kept),
                       as_index(np.setdiff1d(np.arange(zero), rows)), diagonal)
