"""Host-synchronisation and dispatched-op counters for benchmarks/gpu_check.py (issue 17), in a
module of their own (issue 23: gpu_check split by job). gpu_check imports them back, so
``gpu_check.SyncCounter`` and the rest still resolve (tests/test_sync_count.py uses it).

:class:`SyncCounter` patches torch to count, on any device, the calls that would make a CUDA host
wait for the device, each by source line; :func:`cuda_sync_sites` is CUDA's own view
(``torch.cuda.set_sync_debug_mode``); :class:`OpCounter` counts the ATen ops a block
dispatches (a proxy for kernel launches).
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import traceback
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
#: Frames in these files are never a sync's site: the counters' own, and gpu_check's (where
#: the counters lived before the split, so the sites read as they did).
_OWN_FILES = (os.path.abspath(__file__),
              os.path.abspath(os.path.join(os.path.dirname(__file__), "gpu_check.py")))


# ---------------------------------------------------------------- host synchronisations

class SyncCounter:
    """Counts, by patching torch, the calls in a block that make a CUDA host wait for the
    device, on any device (so the CPU sees them too), each with the source line that made it.

    Counted: reading a value back (``item``, ``bool``, ``int``, ``float``, ``tolist``,
    ``equal``, ...);
    ops whose output size depends on the data (``nonzero``, boolean-mask indexing, ``unique``,
    ``masked_select``, ``repeat_interleave`` without ``output_size``, ``bincount``: two, it reads
    min and max); blocking host-to-device copies (``new_tensor``, ``torch.tensor(...,
    device=)``, ``.to(device)`` of a CPU tensor without ``non_blocking``: on the CPU every
    tensor is a CPU tensor, so these count what would cross to a GPU). Not counted: the same
    ops called inside a counted one. ``torch.cuda.set_sync_debug_mode`` is the ground truth on
    CUDA (:func:`cuda_sync_sites`).
    """

    def __init__(self):
        self.events: list[tuple[str, str, int]] = []  # (op, file:line, syncs)
        self._undo: list[tuple[object, str, object]] = []
        self._local = threading.local()
        self._on = False

    def _site(self) -> str:
        return caller_site(skip=(__file__,))

    def _wrap(self, owner, name: str, test=None, n: int = 1) -> None:
        orig = getattr(owner, name)
        local = self._local

        def wrapper(*args, **kwargs):
            depth = getattr(local, "depth", 0)
            if self._on and depth == 0 and (test is None or test(*args, **kwargs)):
                self.events.append((name, self._site(), n))
            local.depth = depth + 1
            try:
                return orig(*args, **kwargs)
            finally:
                local.depth = depth

        setattr(owner, name, wrapper)
        self._undo.append((owner, name, orig))

    def __enter__(self) -> "SyncCounter":
        T = torch.Tensor
        for name in ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy"):
            self._wrap(T, name)
        for owner in (T, torch):
            for name in ("nonzero", "argwhere", "masked_select", "unique", "unique_consecutive"):
                self._wrap(owner, name)
            self._wrap(owner, "bincount", n=2)
            self._wrap(owner, "repeat_interleave", test=_sized_by_data)
        self._wrap(torch, "where", test=lambda *a, **kw: len(a) + len(kw) == 1)
        self._wrap(T, "__getitem__", test=lambda self_, index: _has_mask(index))
        self._wrap(T, "__setitem__", test=lambda self_, index, value: _has_mask(index)
                   and isinstance(value, torch.Tensor))
        self._wrap(T, "new_tensor")
        self._wrap(torch, "tensor", test=lambda *a, **kw: kw.get("device") is not None)
        self._wrap(T, "to", test=_blocking_copy)
        self._wrap(T, "cpu", test=lambda self_, *a, **kw: self_.device.type != "cpu")
        for owner, name in ((torch, "equal"), (T, "equal"), (torch, "allclose"), (T, "allclose")):
            self._wrap(owner, name)
        self._on = True
        return self

    def __exit__(self, *exc) -> None:
        self._on = False
        for owner, name, orig in reversed(self._undo):
            setattr(owner, name, orig)
        self._undo.clear()

    @property
    def total(self) -> int:
        return sum(n for _, _, n in self.events)

    def by_site(self) -> dict[str, int]:
        """``{"file:line op": syncs}``, most first."""
        c = collections.Counter()
        for op, site, n in self.events:
            c[f"{site} {op}"] += n
        return dict(c.most_common())

    def by_file(self) -> dict[str, int]:
        c = collections.Counter()
        for _, site, n in self.events:
            c[site.rsplit(":", 1)[0]] += n
        return dict(c.most_common())


def _sized_by_data(*args, **kwargs) -> bool:
    repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
    if repeats is None:  # torch.repeat_interleave(counts)
        return kwargs.get("output_size") is None
    return (isinstance(repeats, torch.Tensor) and repeats.numel() > 1
            and kwargs.get("output_size") is None)


def _has_mask(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)
               for t in items)


def _blocking_copy(self, *args, **kwargs) -> bool:
    """``.to(device)`` without ``non_blocking`` between host and device; on the CPU, any
    ``.to(device)`` of a (CPU) tensor: on a GPU it would be an upload."""
    if kwargs.get("non_blocking") or any(a is True for a in args[1:]):
        return False
    dev = kwargs.get("device", args[0] if args else None)
    if not isinstance(dev, (str, torch.device)):
        return False
    return self.device.type == "cpu" or torch.device(dev).type != self.device.type


def caller_site(skip: tuple[str, ...] = ()) -> str:
    """``path:line`` (relative to the repository) of the innermost frame outside torch, the
    warnings module and ``skip``."""
    torch_dir = os.path.dirname(torch.__file__)
    for frame in reversed(traceback.extract_stack()[:-1]):
        f = os.path.abspath(frame.filename)
        if (f.startswith(torch_dir) or f in skip or f in _OWN_FILES
                or os.path.basename(f) == "warnings.py"):
            continue
        try:
            f = os.path.relpath(f, ROOT)
        except ValueError:
            pass
        return f"{f}:{frame.lineno}"
    return "?"


@contextlib.contextmanager
def cuda_sync_sites():
    """Yields a Counter ``{"file:line": n}`` of the synchronising CUDA calls in the block, as
    ``torch.cuda.set_sync_debug_mode("warn")`` reports them (empty on the CPU)."""
    sites: collections.Counter = collections.Counter()
    if not torch.cuda.is_available():
        yield sites
        return
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message):
                sites[caller_site()] += 1
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield sites
        finally:
            torch.cuda.set_sync_debug_mode("default")


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched in a block, views aside: a proxy for kernel launches
    (each costs host time on a GPU, about 5-20 us in eager PyTorch)."""

    VIEWS = {"detach", "view", "slice", "t", "unbind", "select", "alias", "_unsafe_view",
             "as_strided", "expand", "unsqueeze", "squeeze", "transpose", "reshape", "permute"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in self.VIEWS:
            self.count += 1
        return func(*args, **(kwargs or {}))
