"""ATen-level counts of what one training update dispatches, and the ops that make the host wait.

:class:`OpCounter` is a ``TorchDispatchMode`` that sees every ATen op below autograd (forward,
backward and optimizer alike). An op is *kernel-launching* unless it only makes a view or reads
metadata (:func:`launches_kernel`): on a GPU each launching op is at least one kernel launch, so
their count bounds how host-bound a small model's step is. The same counter backs the no-sync test
(``tests/test_opcount.py``) and ``scripts/bench.py``'s op columns.

A *host sync* is an op whose result the host must wait for, or whose output shape depends on
values (:func:`host_sync`): ``.item()`` / ``float(t)`` / ``bool(t)`` (``aten._local_scalar_dense``),
``nonzero``, ``masked_select``, boolean-mask indexing, and copies to the CPU from another device.
On a CPU tensor ``.cpu()``, ``.tolist()`` and ``.numpy()`` dispatch nothing, so :class:`OpCounter`
with ``patch_host_reads=True`` also records those calls.
"""
from __future__ import annotations

from collections import Counter
from contextlib import ExitStack
from typing import Any
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# ops that allocate or read metadata without launching a kernel (views are found by their schema)
_NO_KERNEL = {
    aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default, aten.new_empty.default,
    aten.new_empty_strided.default, aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default,
    aten.sym_storage_offset.default, aten.is_same_size.default, aten.lift_fresh.default, aten.set_.source_Storage,
    aten.set_.source_Storage_storage_offset, aten.resize_.default, aten._unsafe_view.default,
}
_SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
             aten.unique_consecutive.default, aten._unique2.default, aten.unique_dim.default,
             aten.repeat_interleave.Tensor}
_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


def launches_kernel(func: Any) -> bool:
    """True for an ATen op that launches work on its device: not a view, not an allocation or metadata read."""
    if func in _NO_KERNEL:
        return False
    return not getattr(func, "is_view", False)


def _bool_index(indices: Any) -> bool:
    return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in (indices or []))


def host_sync(func: Any, args: tuple, kwargs: dict) -> str | None:
    """The reason an op makes the host wait for the device (or has a data-dependent shape), else None."""
    name = func.overloadpacket.__name__
    if func in _SYNC_OPS:
        return name
    if func in _INDEX_OPS and _bool_index(args[1] if len(args) > 1 else kwargs.get("indices")):
        return f"{name} with a boolean index"
    if func in (aten._to_copy.default, aten.copy_.default):
        src = args[1] if func is aten.copy_.default else args[0]
        dst = args[0].device if func is aten.copy_.default else kwargs.get("device")
        if isinstance(src, torch.Tensor) and dst is not None and torch.device(dst).type == "cpu" \
                and src.device.type != "cpu":
            return f"{name} to the CPU"
    return None


class OpCounter(TorchDispatchMode):
    """Count ATen ops (all and kernel-launching) and record host syncs while active.

    ``with OpCounter() as c: update()`` then ``c.total``, ``c.launching``, ``c.syncs`` (reasons, in order)
    and ``c.by_op`` (a Counter of op names). ``patch_host_reads``: also record ``Tensor.cpu``,
    ``.tolist``, ``.numpy`` and ``.item`` calls, which on CPU tensors dispatch no ATen op.
    """

    def __init__(self, patch_host_reads: bool = False) -> None:
        super().__init__()
        self.total = 0
        self.launching = 0
        self.by_op: Counter[str] = Counter()
        self.syncs: list[str] = []
        self._patch = patch_host_reads
        self._stack: ExitStack | None = None

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        self.total += 1
        if launches_kernel(func):
            self.launching += 1
        self.by_op[str(func.overloadpacket.__name__)] += 1
        reason = host_sync(func, args, kwargs)
        if reason is not None:
            self.syncs.append(reason)
        return func(*args, **kwargs)

    def _recorder(self, name: str, real: Any) -> Any:
        def call(t: torch.Tensor, *a: Any, **k: Any) -> Any:
            self.syncs.append(f"Tensor.{name}")
            return real(t, *a, **k)

        return call

    def __enter__(self) -> "OpCounter":
        if self._patch:
            self._stack = ExitStack()
            for name in ("cpu", "tolist", "numpy", "item"):
                real = getattr(torch.Tensor, name)
                self._stack.enter_context(mock.patch.object(torch.Tensor, name, self._recorder(name, real)))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def summary(self) -> dict[str, Any]:
        return {"aten_ops": self.total, "aten_launching": self.launching, "host_syncs": len(self.syncs)}
