"""Activation memory measured as bytes saved for backward (DESIGN.md section 7).

Every tensor autograd saves during a training step passes through ``saved_tensors_hooks``; the meter
records its storage once (views and re-saves of one storage count once) and sums the storage sizes.
The figure is exact and device independent: a CPU run gives the number a GPU run would.

Parameters are not activations: a frozen weight saved by its matmul is kept alive by the model anyway,
so tensors that are (views of) ``nn.Parameter`` objects, and storages of the modules passed as
``exclude``, are not counted. With gradient checkpointing, tensors saved inside a checkpointed region
are handled by the checkpoint's own hooks and are not seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


class SavedTensorMeter:
    """Context manager counting the bytes of distinct storages saved for backward inside it.

    Example::

        with SavedTensorMeter(exclude=model) as meter:
            model(**batch).loss.backward()
        print(meter.total_bytes)

    Recorded storages are kept alive until the context exits, so a storage freed and re-allocated at the
    same address inside the context is never mistaken for the same one.
    """

    def __init__(self, exclude: nn.Module | Iterable[torch.Tensor] | None = None) -> None:
        tensors: Iterable[torch.Tensor]
        if isinstance(exclude, nn.Module):
            tensors = [*exclude.parameters(), *exclude.buffers()]
        else:
            tensors = list(exclude or [])
        self._excluded = {_storage_key(t) for t in tensors}
        self._storages: dict[tuple[str, int], torch.UntypedStorage] = {}
        self._hooks: Any = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter):
            return t
        key = _storage_key(t)
        if key not in self._excluded and key not in self._storages:
            self._storages[key] = t.untyped_storage()
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    @property
    def total_bytes(self) -> int:
        """Sum of the sizes of the distinct storages saved so far."""
        return sum(s.nbytes() for s in self._storages.values())

    @property
    def num_storages(self) -> int:
        return len(self._storages)

    def __enter__(self) -> SavedTensorMeter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None
        self._storages = {key: _Released(nbytes=s.nbytes()) for key, s in self._storages.items()}


class _Released:
    """Stands in for a storage after the meter exits, so the memory is freed but the size is kept."""

    def __init__(self, nbytes: int) -> None:
        self._nbytes = nbytes

    def nbytes(self) -> int:
        return self._nbytes


def saved_activation_bytes(
    step_fn: Callable[[], Any], *, exclude: nn.Module | Iterable[torch.Tensor] | None = None
) -> int:
    """Bytes of tensors saved for backward while ``step_fn()`` runs, deduplicated by storage.

    ``step_fn`` is typically one forward pass plus ``loss.backward()``. Pass the model as ``exclude`` so
    its parameter and buffer storages are never counted (parameters are never counted in any case).
    """
    with SavedTensorMeter(exclude=exclude) as meter:
        step_fn()
    return meter.total_bytes
