"""Count host synchronizations on any device, to keep GPU hot paths free of them.

A host synchronization is any operation that makes the Python thread wait for
the device: reading a value (``.item()``, ``float(t)``, ``int(t)``, ``bool(t)``,
``.tolist()``, ``torch.equal``), an operation whose output shape depends on the
data (``nonzero``, boolean-mask indexing, ``unique``, ``masked_select``), a
blocking copy between devices (``.cpu()``, ``.to(device)``), and the few CUDA
kernels that check their own status on the host (``torch.linalg.cholesky``,
``solve``, ``svd``, ``eigh``, ``pinv``, ``lstsq``: the ``_ex`` variants do not).

On the CPU none of these costs anything, which is why they creep in unseen;
:func:`count_host_syncs` makes them visible there.  It is a
:class:`~torch.utils._python_dispatch.TorchDispatchMode`, so it sees every aten
operation below autograd and the ``torch.func`` transforms (``grad``, ``vjp``,
``vmap``), plus two Python-level patches for the reads that bypass the
dispatcher on the CPU (``Tensor.tolist`` and ``Tensor.numpy``).  What each
Python call dispatches to (torch 2.13):

===============================================  ==========================================
``t.item()``, ``float(t)``, ``int(t)``,            ``aten._local_scalar_dense``
``bool(t)``, ``f"{t:.3g}"``, ``math.isfinite(t)``,
``list[t]`` (``__index__``), ``max(t1, t2)``
``torch.equal``, ``torch.allclose``                ``aten.equal``, ``aten.allclose``
``t.nonzero()``, ``torch.where(c)``, ``argwhere``  ``aten.nonzero``
``t[mask]``, ``t[mask] = v``                       ``aten.index.Tensor`` / ``aten.index_put_``
                                                   with a boolean index
``t.cpu()``, ``t.to("cpu")``, ``t.to("cuda")``     ``aten._to_copy`` across devices (nothing
                                                   on a CPU tensor moved to the CPU)
``t.tolist()``, ``t.numpy()``                      nothing on the CPU (patched here); on CUDA
                                                   ``tolist`` copies with ``aten._to_copy``
``torch.linalg.cholesky`` / ``solve`` / ...        ``aten._linalg_check_errors``
===============================================  ==========================================

The counter tests what the code asks of the device, so the CPU suffices: a
path that counts no syncs here runs without any on CUDA.  The one deliberate
exception is ``torch.optim``'s step counter (``optimizer.py::_get_value``),
which torch keeps as a CPU tensor on every device: reading it is not a sync.

Example::

    with count_host_syncs() as syncs:
        x, info = CG(maxiter=50)(matvec, b, batch_dims=1)
    assert syncs.count <= 50 // 8 + 3, syncs.report()
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

_READS = {
    aten._local_scalar_dense,  # .item(), float(t), int(t), bool(t)
    aten.equal,
    aten.allclose,
    aten.is_nonzero,
    aten._linalg_check_errors,  # linalg.cholesky / solve / inv / lu_factor without _ex
}
_DATA_DEPENDENT_SHAPE = {
    aten.nonzero,
    aten.masked_select,
    aten._unique,
    aten._unique2,
    aten.unique_dim,
    aten.unique_consecutive,
    aten.bincount,
}
# kernels that read a status on the host inside (CUDA), invisible below the dispatcher
_INTERNAL = {
    aten._linalg_svd,
    aten._linalg_eigh,
    aten.linalg_eig,
    aten.linalg_eigvals,
    aten.linalg_pinv,
    aten.linalg_lstsq,
}
_INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
_COPIES = {aten._to_copy, aten.copy_, aten._copy_from}

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_THIS_FILE = os.path.abspath(__file__)
_ROOT = os.path.dirname(os.path.dirname(_THIS_FILE)) + os.sep


def _device(x) -> torch.device | None:
    return x.device if isinstance(x, torch.Tensor) else None


def _is_sync(func, args, kwargs) -> bool:
    packet = func.overloadpacket
    if packet in _READS or packet in _DATA_DEPENDENT_SHAPE or packet in _INTERNAL:
        return True
    if packet is aten.repeat_interleave:  # output size from the data unless given
        return func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None
    if packet in _INDEXING:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())
    if packet in _COPIES:
        if kwargs.get("non_blocking") or (func is aten.copy_.default and len(args) > 2 and args[2]):
            return False
        if packet is aten._to_copy:
            source, target = _device(args[0]), kwargs.get("device")
        else:  # copy_(dst, src), _copy_from(src, dst)
            first, second = _device(args[0]), _device(args[1] if len(args) > 1 else kwargs.get("dst"))
            source, target = (second, first) if packet is aten.copy_ else (first, second)
        return source is not None and target is not None and torch.device(target) != source
    return False


def _where(frame) -> str:
    path = os.path.abspath(frame.f_code.co_filename)
    return f"{path.removeprefix(_ROOT)}:{frame.f_lineno} ({frame.f_code.co_name})"


def _caller() -> tuple[str, bool]:
    """The first frame outside torch and this module and its caller
    (``path:line (function) <- path:line (function)``), and whether the read
    comes from ``torch.optim``'s host-side step counter."""
    frame = sys._getframe(2)
    optimizer_step = False
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path.startswith(_TORCH_DIR):
            optimizer_step = optimizer_step or (
                frame.f_code.co_name == "_get_value" and path.endswith(os.path.join("optim", "optimizer.py")))
        elif path != _THIS_FILE:
            caller = f" <- {_where(frame.f_back)}" if frame.f_back is not None else ""
            return _where(frame) + caller, optimizer_step
        frame = frame.f_back
    return "<unknown>", optimizer_step


class HostSyncCounter(TorchDispatchMode):
    """A dispatch mode counting host synchronizations (see the module docstring).

    Attributes:
        count: synchronizations seen.
        sites: ``Counter`` of ``"path:line (function) <- path:line (function)"``:
            the first frame outside torch (the code that asked) and its caller.
        ops: ``Counter`` of the aten operations (or ``"Tensor.tolist"``).
    """

    def __init__(self):
        super().__init__()
        self.count = 0
        self.sites: Counter = Counter()
        self.ops: Counter = Counter()
        self._quiet = 0

    def record(self, op: str) -> None:
        site, optimizer_step = _caller()
        if optimizer_step:
            return
        self.count += 1
        self.sites[site] += 1
        self.ops[op] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._quiet and _is_sync(func, args, kwargs):
            self.record(str(func.overloadpacket))
        return func(*args, **kwargs)

    def reset(self) -> None:
        self.count = 0
        self.sites.clear()
        self.ops.clear()

    def report(self, top: int = 12) -> str:
        """The count and the most frequent call sites and operations."""
        lines = [f"{self.count} host synchronization(s)"]
        lines += [f"  {n:5d}  {site}" for site, n in self.sites.most_common(top)]
        lines += [f"  ops: {dict(self.ops.most_common(top))}"]
        return "\n".join(lines)


@contextlib.contextmanager
def count_host_syncs() -> Iterator[HostSyncCounter]:
    """Count the host synchronizations of the code run inside the block."""
    counter = HostSyncCounter()
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def patched(name):
        original = originals[name]

        def read(self, *args, **kwargs):
            counter.record(f"Tensor.{name}")
            counter._quiet += 1  # on a device, tolist copies with _to_copy: count it once
            try:
                return original(self, *args, **kwargs)
            finally:
                counter._quiet -= 1

        return read

    for name in originals:
        setattr(torch.Tensor, name, patched(name))
    try:
        with counter:
            yield counter
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def simulate_accelerator(monkeypatch, every: int = 8) -> int:
    """Make every ``_sync_every`` policy of the library answer ``every`` (the
    accelerator setting) on the CPU; returns how many modules were patched."""
    patched = 0
    for name, module in list(sys.modules.items()):
        if (name == "bilevel" or name.startswith("bilevel.")) and callable(getattr(module, "_sync_every", None)):
            monkeypatch.setattr(module, "_sync_every", lambda *args, **kwargs: every)
            patched += 1
    return patched


__all__ = ["HostSyncCounter", "count_host_syncs", "simulate_accelerator"]
