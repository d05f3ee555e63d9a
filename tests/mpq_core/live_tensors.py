"""Peak bytes of the tensors alive at once while some code runs: a dispatch mode sees every
tensor an op returns (inside TorchScript and torch.export models too) and counts its storage
until the last Python tensor on that storage is gone."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LivePeak(TorchDispatchMode):
    """Counts the storages of tensors created inside the block; ``peak`` is the most bytes
    alive at once, ``at_mark`` the bytes alive each time the op ``mark`` was about to run.
    Tensors made before the block (parameters, the data) are not counted."""

    def __init__(self, mark: Any = None) -> None:
        super().__init__()
        self.refs: dict[int, int] = {}  # storage address -> live tensors on it
        self.sizes: dict[int, int] = {}
        self.live = 0
        self.peak = 0
        self.mark = mark  # an op (e.g. a model's first) before which ``live`` is recorded
        self.at_mark: list[int] = []

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.live -= self.sizes.pop(key)

    def _track(self, t: torch.Tensor, inputs: set[int]) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or (key in inputs and key not in self.refs):
            return  # a view or in-place result of a tensor made before the block
        if key not in self.refs:
            self.refs[key] = 0
            self.sizes[key] = storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self.refs[key] += 1
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is self.mark:
            self.at_mark.append(self.live)
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t, inputs)
        return out
