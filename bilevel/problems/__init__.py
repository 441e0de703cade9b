"""Ready-made bilevel problems with data and, where known, the exact answer.

Every builder returns a :class:`BilevelProblem` (``outer(x, y)``,
``inner(x, y)``, start point, optional constraints, known solution, extras in
``data``) and takes a ``dtype=`` argument; ``problem.with_dtype(dtype)``
rebuilds an existing one.  This package depends only on torch (numpy and
scikit-learn for the bundled data sets), never on the rest of :mod:`bilevel`.

Problems with known answers (ALGORITHMS.md, section 8):

* :func:`quadratic` — Q, strongly convex, closed-form ``y*(x)``, hypergradient, ``x*``;
* :func:`nonunique_lower_level` — M1, non-unique lower level, ``x* = e``;
* :func:`coupled_constraint` — L, active coupled inequality ``y <= x``, ``x* = 0.5 e``.

Hyper-parameter problems (closed forms where they exist):

* :func:`ridge`, :func:`ridge_diabetes` / :class:`RidgeHPO` — one ridge penalty per feature;
* :func:`logistic_breast_cancer` — one logistic L2 penalty per feature;
* :func:`hyper_cleaning_digits` — data hyper-cleaning, one weight per training example.

PDEs with closed-form solutions (for the hard-constraint layers, :class:`PDEProblem`):

* :func:`heat_1d` — the heat equation :math:`u_t = \\nu u_{xx}`, a decaying sine;
* :func:`burgers_1d` — viscous Burgers, the Cole-Hopf solution.
"""

from .base import BilevelProblem, LevelBatches, Solution
from .classification import hyper_cleaning_digits, logistic_breast_cancer
from .pde import PDEProblem, burgers_1d, heat_1d
from .ridge import RidgeHPO, ridge, ridge_diabetes
from .toys import coupled_constraint, nonunique_lower_level, project_below_diagonal, quadratic

__all__ = [
    "LevelBatches",
    "BilevelProblem",
    "PDEProblem",
    "RidgeHPO",
    "Solution",
    "burgers_1d",
    "coupled_constraint",
    "heat_1d",
    "hyper_cleaning_digits",
    "logistic_breast_cancer",
    "nonunique_lower_level",
    "project_below_diagonal",
    "quadratic",
    "ridge",
    "ridge_diabetes",
]
