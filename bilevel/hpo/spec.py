r"""Hyper-parameter specifications: names, shapes, constraints, initial values.

A hyper-parameter is optimized in an *unconstrained* raw space and mapped into
its admissible set by a smooth transform :math:`\lambda = T(\rho)`:

=====================  ==========================================  ==================
bounds                 transform :math:`T(\rho)`                   typical use
=====================  ==========================================  ==================
none                   :math:`\rho`                                a shift, a logit
``low`` only           :math:`l + e^{\rho}` (or softplus)          weight decay > 0
``high`` only          :math:`h - e^{\rho}` (or softplus)          a capped value
``low`` and ``high``   :math:`l + (h - l)\,\sigma(\rho)`           a rate in [0, 1]
both, ``log=True``     :math:`\exp(\log l + (\log h - \log l)\sigma(\rho))`  a scale in [1e-6, 1]
=====================  ==========================================  ==================

so every gradient step keeps the hyper-parameter admissible (the log / logit
parametrization of Lorraine & Duvenaud 2018 and MacKay et al. 2019).  A
:class:`Hyper` is either a tensor of a fixed ``shape``, *one per weight* of some
parameters of the model (``per_weight``: the value is a dict of tensors shaped
like those parameters) or *one per training example* (``per_example``: a vector
as long as the training set).  :class:`HyperSpec` names them and resolves them
against a model and a training set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..typing import TensorTree

__all__ = ["Hyper", "HyperSpec", "ResolvedSpec"]

_TRANSFORMS = ("identity", "exp", "softplus", "sigmoid")


def _finite_or_none(v) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))


@dataclass(frozen=True)
class Hyper:
    r"""One hyper-parameter: its shape, admissible interval and initial value.

    Args:
        init: initial value in the *constrained* space, a float (broadcast to
            the shape) or a tensor of the shape; must lie strictly inside
            ``(low, high)``.
        low, high: optional bounds (finite floats, ``low < high``); they choose
            the transform (module table).  ``low=0`` makes a positive
            hyper-parameter, ``low=0, high=1`` a rate.
        shape: shape of a fixed-size hyper-parameter, default ``()`` (a scalar).
        per_weight: one hyper-parameter per weight: ``True`` for every trainable
            parameter of the model, or a parameter name / list of names
            (``"0.weight"``, as in ``model.named_parameters()``).  The value is
            a dict ``{name: tensor shaped like the parameter}``.
        per_example: one hyper-parameter per training example (a vector of
            length ``len(train_loader.dataset)``; batches should carry the
            example indices to look their entries up).
        transform: ``"exp"`` (default with one bound) or ``"softplus"``; with no
            bound only ``"identity"``, with two only ``"sigmoid"``.
        log: with two positive bounds, interpolate on a log scale.

    Raises:
        ValueError: naming the field: bounds not finite or not ordered, an
            initial value outside the bounds, an unknown or incompatible
            transform, more than one of ``shape`` / ``per_weight`` / ``per_example``.

    Example:
        >>> import torch
        >>> from bilevel.hpo import Hyper
        >>> rate = Hyper(0.1, low=0.0, high=1.0)            # sigmoid of a logit
        >>> raw = rate.to_raw(torch.tensor(0.1))
        >>> round(float(raw), 4), round(float(rate.constrain(raw)), 4)
        (-2.1972, 0.1)
    """

    init: Union[float, torch.Tensor] = 0.0
    low: Optional[float] = None
    high: Optional[float] = None
    shape: tuple = ()
    per_weight: Union[None, bool, str, Sequence[str]] = None
    per_example: bool = False
    transform: Optional[str] = None
    log: bool = False

    def __post_init__(self):
        for name in ("low", "high"):
            if not _finite_or_none(getattr(self, name)):
                raise ValueError(f"Hyper: `{name}` must be a finite float or None; got {getattr(self, name)!r}.")
        if self.low is not None and self.high is not None and not self.low < self.high:
            raise ValueError(f"Hyper: `low` must be below `high`; got low={self.low!r}, high={self.high!r}.")
        if not (isinstance(self.shape, tuple) and all(isinstance(s, int) and s >= 0 for s in self.shape)):
            raise ValueError(f"Hyper: `shape` must be a tuple of non-negative ints; got {self.shape!r}.")
        kinds = [self.shape != (), self.per_weight not in (None, False), bool(self.per_example)]
        if sum(kinds) > 1:
            raise ValueError("Hyper: give at most one of `shape`, `per_weight` and `per_example`.")
        if self.log and not (self.low is not None and self.high is not None and self.low > 0):
            raise ValueError(
                f"Hyper: `log=True` needs two positive bounds; got low={self.low!r}, high={self.high!r}."
            )
        expected = self._allowed_transforms()
        if self.transform is not None and self.transform not in expected:
            raise ValueError(
                f"Hyper: `transform` must be one of {expected} with low={self.low!r}, high={self.high!r}; "
                f"got {self.transform!r}."
            )
        init = torch.as_tensor(self.init, dtype=torch.float64)
        if not bool(torch.isfinite(init).all()):
            raise ValueError(f"Hyper: `init` must be finite; got {self.init!r}.")
        inside = torch.ones_like(init, dtype=torch.bool)
        if self.low is not None:
            inside &= init > self.low
        if self.high is not None:
            inside &= init < self.high
        if not bool(inside.all()):
            raise ValueError(
                f"Hyper: `init` must lie strictly inside (low, high) = ({self.low}, {self.high}); got "
                f"{self.init if init.numel() == 1 else 'a tensor with entries outside'}."
            )

    def _allowed_transforms(self) -> tuple:
        bounds = (self.low is not None) + (self.high is not None)
        return (("identity",), ("exp", "softplus"), ("sigmoid",))[bounds]

    @property
    def kind(self) -> str:
        """``"identity"``, ``"exp"``, ``"softplus"`` or ``"sigmoid"``: the transform used."""
        return self.transform or self._allowed_transforms()[0]

    def constrain(self, raw: torch.Tensor) -> torch.Tensor:
        r"""The hyper-parameter :math:`\lambda = T(\rho)` from its raw value ``raw``."""
        kind, low, high = self.kind, self.low, self.high
        if kind == "identity":
            return raw
        if kind == "sigmoid":
            if self.log:
                a, b = math.log(low), math.log(high)
                return torch.exp(a + (b - a) * torch.sigmoid(raw))
            return low + (high - low) * torch.sigmoid(raw)
        grow = raw.exp() if kind == "exp" else F.softplus(raw)
        return low + grow if low is not None else high - grow

    def to_raw(self, value: torch.Tensor) -> torch.Tensor:
        r"""The raw value :math:`\rho = T^{-1}(\lambda)` of a constrained ``value``.

        Raises:
            ValueError: a value outside ``(low, high)``, or one that lies on a bound in
                ``value``'s dtype (e.g. ``1 - 1e-8`` in float32 for ``high=1``): its
                raw value would be infinite or NaN.
        """
        raw = self._raw(value)
        if not bool(torch.isfinite(raw).all()):
            raise ValueError(
                f"Hyper: a value must lie strictly inside (low, high) = ({self.low}, {self.high}) in "
                f"{value.dtype}; got {_describe_values(value)}, whose raw value is not finite."
            )
        return raw

    def _raw(self, value: torch.Tensor) -> torch.Tensor:
        kind, low, high = self.kind, self.low, self.high
        if kind == "identity":
            return value.clone()
        if kind == "sigmoid":
            if self.log:
                a, b = math.log(low), math.log(high)
                return torch.logit((value.log() - a) / (b - a))
            return torch.logit((value - low) / (high - low))
        gap = value - low if low is not None else high - value
        return gap.log() if kind == "exp" else gap + torch.log(-torch.expm1(-gap))


def _describe_values(value: torch.Tensor) -> str:
    if value.numel() == 1:
        return repr(float(value.reshape(())))
    return f"entries from {float(value.min()):.6g} to {float(value.max()):.6g}"


@dataclass(frozen=True)
class _Entry:
    """A resolved hyper-parameter: its leaves' shapes (one per weight name)."""

    name: str
    hyper: Hyper
    shapes: Mapping[str, tuple]  # {"": shape} for a plain tensor, else per parameter name
    tree: bool  # whether the value is a dict of tensors


class ResolvedSpec:
    """A :class:`HyperSpec` bound to a model and a training set size.

    Holds the raw initial values (dtype and device of the model) and maps raw
    trees to constrained values (:meth:`constrain`).
    """

    def __init__(self, entries: list[_Entry], dtype: torch.dtype, device: torch.device):
        self.entries = entries
        self.dtype, self.device = dtype, device

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def numel(self) -> int:
        """Total number of scalar hyper-parameters."""
        return sum(math.prod(s) for e in self.entries for s in e.shapes.values())

    def init_raw(self) -> dict:
        """Raw initial values: ``{name: tensor}`` or ``{name: {param: tensor}}``."""
        raw = {}
        for e in self.entries:
            leaves = {}
            for key, shape in e.shapes.items():
                init = torch.as_tensor(e.hyper.init, dtype=self.dtype, device=self.device)
                if init.dim() and tuple(init.shape) != tuple(shape):
                    where = f"the shape of parameter {key!r}" if e.tree else "its resolved shape"
                    raise ValueError(
                        f"HyperSpec: hyper-parameter {e.name!r} has an `init` of shape {tuple(init.shape)}, "
                        f"but {where} is {tuple(shape)}."
                    )
                try:
                    leaves[key] = e.hyper.to_raw(init.expand(shape).clone())
                except ValueError as err:
                    raise ValueError(f"HyperSpec: the `init` of hyper-parameter {e.name!r}: {err}") from None
            raw[e.name] = leaves if e.tree else leaves[""]
        return raw

    def constrain(self, raw: Mapping[str, TensorTree]) -> "HyperValues":
        """Constrained values ``{name: tensor or {param: tensor}}`` of a raw tree."""
        out = HyperValues()
        for e in self.entries:
            value = raw[e.name]
            if e.tree:
                out[e.name] = {k: e.hyper.constrain(v) for k, v in value.items()}
            else:
                out[e.name] = e.hyper.constrain(value)
        return out

    def summary(self, values: Mapping[str, TensorTree]) -> dict[str, float]:
        """Floats for the history: a scalar's value, a tensor's mean (one key per leaf)."""
        out = {}
        for e in self.entries:
            value = values[e.name]
            leaves = value.items() if e.tree else [("", value)]
            for key, t in leaves:
                out[f"{e.name}.{key}" if key else e.name] = float(t.detach().mean())
        return out


class HyperValues(dict):
    """The constrained hyper-parameters handed to the training loss: a dict
    whose missing keys raise an error listing the specified names."""

    def __missing__(self, key):
        raise KeyError(
            f"the training loss asked for hyper-parameter {key!r}, which the spec does not define; "
            f"it defines {sorted(self)}."
        )


class HyperSpec(dict):
    """Named hyper-parameters: ``HyperSpec(weight_decay=Hyper(1e-3, low=0), ...)``.

    A ``dict`` of :class:`Hyper`; plain dicts are accepted wherever a spec is.

    Args:
        args: at most one mapping (or iterable of ``(name, Hyper)`` pairs), as
            for :class:`dict`.
        hypers: ``name=Hyper(...)`` pairs; names are non-empty strings, the
            keys of ``hparams`` in the training loss.

    Raises:
        TypeError: a value is not a :class:`Hyper`.
        ValueError: a name is empty, or no hyper-parameter is given.

    Example:
        >>> import torch
        >>> from bilevel.hpo import Hyper, HyperSpec
        >>> model = torch.nn.Linear(3, 2)
        >>> spec = HyperSpec(decay=Hyper(1e-2, low=0.0, per_weight="weight"), rate=Hyper(0.5, low=0, high=1))
        >>> resolved = spec.resolve(model, n_train=100)
        >>> raw = resolved.init_raw()
        >>> raw["decay"]["weight"].shape, resolved.numel()
        (torch.Size([2, 3]), 7)
    """

    def __init__(self, *args, **hypers):
        super().__init__(*args, **hypers)
        for name, hyper in self.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"HyperSpec: names must be non-empty strings; got {name!r}.")
            if not isinstance(hyper, Hyper):
                raise TypeError(
                    f"HyperSpec: {name!r} must be a bilevel.hpo.Hyper; got {type(hyper).__name__}."
                )
        if not self:
            raise ValueError("HyperSpec: no hyper-parameter given; name at least one, e.g. "
                             "HyperSpec(weight_decay=Hyper(1e-3, low=0.0)).")

    def resolve(self, model: torch.nn.Module, n_train: Optional[int] = None) -> ResolvedSpec:
        """Bind the spec to ``model`` (its parameters, dtype and device) and to a
        training set of ``n_train`` examples (needed by ``per_example``)."""
        params = {k: p for k, p in model.named_parameters() if p.requires_grad}
        if not params:
            raise ValueError("the model has no trainable parameter (requires_grad=True) to tune for.")
        first = next(iter(params.values()))
        entries = [self._entry(name, h, params, n_train) for name, h in self.items()]
        return ResolvedSpec(entries, first.dtype, first.device)

    @staticmethod
    def _entry(name: str, h: Hyper, params: dict, n_train: Optional[int]) -> _Entry:
        if h.per_weight not in (None, False):
            names = list(params) if h.per_weight is True else (
                [h.per_weight] if isinstance(h.per_weight, str) else list(h.per_weight))
            unknown = [n for n in names if n not in params]
            if unknown or not names:
                raise ValueError(
                    f"spec {name!r}: `per_weight` names parameter(s) {unknown or names} that the model does not "
                    f"have (or none); its trainable parameters are {list(params)}."
                )
            return _Entry(name, h, {n: tuple(params[n].shape) for n in names}, True)
        if h.per_example:
            if not isinstance(n_train, int) or n_train < 1:
                raise ValueError(
                    f"spec {name!r}: `per_example` needs the number of training examples, but the "
                    "training loader's dataset has no len(); give the hyper-parameter shape=(n,) instead."
                )
            return _Entry(name, h, {"": (n_train,)}, False)
        return _Entry(name, h, {"": tuple(h.shape)}, False)


def as_spec(spec) -> HyperSpec:
    """A :class:`HyperSpec` from a spec or a plain dict (errors name ``spec``)."""
    if isinstance(spec, HyperSpec):
        return spec
    if isinstance(spec, Mapping):
        return HyperSpec(dict(spec))
    raise TypeError(f"`spec` must be a HyperSpec or a dict of Hyper; got {type(spec).__name__}.")
