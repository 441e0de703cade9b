"""Ready-made bilevel problems with data and, where known, the exact answer."""

from .ridge import RidgeHPO, ridge_diabetes

__all__ = ["RidgeHPO", "ridge_diabetes"]
