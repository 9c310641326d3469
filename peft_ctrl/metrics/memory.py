"""Activation memory measured as bytes saved for backward (docs/state_ctrl.md, "How memory is measured").

Every tensor autograd saves during a training step passes through ``saved_tensors_hooks``; the meter
records its storage once (views and re-saves of one storage count once) and sums the storage sizes.
The figure is exact and device independent: a CPU run gives the number a GPU run would.

Parameters are not activations: a frozen weight saved by its matmul is kept alive by the model anyway,
so tensors that are (views of) ``nn.Parameter`` objects, and storages of the modules passed as
``exclude``, are not counted.

Gradient checkpointing changes what is alive when. A checkpointed region keeps only its inputs through the
forward pass; during the backward pass it is recomputed and its own saved tensors live until its backward
is done, one region at a time. The meter therefore reports the *peak*::

    peak = (everything saved outside checkpointed regions, the regions' inputs included)
           + max over regions (what one region saves when it is recomputed, beyond its inputs)

Neither checkpoint mode shows this to plain hooks (the reentrant one recomputes during backward, where every
region would be counted on top of the others; the non-reentrant one hides the region's tensors behind its own
hooks), so the meter measures each region itself: right after a region's forward it runs the region once more
without checkpointing, with gradients on and the random state restored afterwards, and counts what that run
saves. Regions are found automatically on transformers models (layers with ``gradient_checkpointing`` on) or
passed as ``checkpointed=[modules]`` for models that call ``torch.utils.checkpoint`` themselves. Tensors saved
during the backward pass (the recomputation itself) are not counted again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    """One key per storage: its device and the identity of its StorageImpl (``_cdata``; views share it). Not the
    data pointer, which is 0 for every storage on the meta device, where the memory planner counts."""
    return (str(t.device), t.untyped_storage()._cdata)


def in_backward_pass() -> bool:
    """Whether autograd's engine is running a backward pass on this thread (tests/test_metrics.py checks it)."""
    return torch._C._current_graph_task_id() != -1


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def checkpointed_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of a transformers model that run under gradient checkpointing (``gradient_checkpointing`` on)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers without per-layer checkpointing: nothing to find
        return []
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]


class SavedTensorMeter:
    """Context manager counting the peak bytes of distinct storages saved for backward inside it.

    Example::

        with SavedTensorMeter(exclude=model) as meter:
            model(**batch).loss.backward()
        print(meter.total_bytes)

    ``checkpointed`` lists modules whose calls are gradient-checkpointed regions; by default they are found
    in ``exclude`` when it is a transformers model (see the module docstring). Recorded storages are kept
    alive until the context exits, so a storage freed and re-allocated at the same address inside the context
    is never mistaken for the same one.
    """

    def __init__(
        self,
        exclude: nn.Module | Iterable[torch.Tensor] | None = None,
        checkpointed: Iterable[nn.Module] | None = None,
    ) -> None:
        tensors: Iterable[torch.Tensor]
        if isinstance(exclude, nn.Module):
            tensors = [*exclude.parameters(), *exclude.buffers()]
            if checkpointed is None:
                checkpointed = checkpointed_layers(exclude)
        else:
            tensors = list(exclude or [])
        self._excluded = {_storage_key(t) for t in tensors}
        self._regions = list(checkpointed or [])
        self._storages: dict[tuple[str, int], torch.UntypedStorage] = {}
        self._last_dims: dict[tuple[str, int], int] = {}
        self._region_bytes: list[int] = []
        self._measured: set[int] = set()
        self._rerun: dict[tuple[str, int], torch.UntypedStorage] | None = None
        self._calls: dict[int, tuple[tuple, dict]] = {}
        self._hooks: Any = None
        self._handles: list[Any] = []

    def _countable(self, t: torch.Tensor) -> bool:
        if isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter):
            return False
        return _storage_key(t) not in self._excluded

    def _add(self, t: torch.Tensor, into: dict[tuple[str, int], torch.UntypedStorage]) -> None:
        if self._countable(t):
            key = _storage_key(t)
            if key not in into:
                into[key] = t.untyped_storage()
                if into is self._storages:  # a re-run's storages die after it: their keys can come back
                    self._last_dims[key] = t.shape[-1] if t.dim() else 0

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if self._rerun is not None:
            self._add(t, self._rerun)
        elif not in_backward_pass():
            self._add(t, self._storages)
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def _before_region(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if id(module) in self._measured or in_backward_pass() or self._rerun is not None:
            return
        if hasattr(module, "gradient_checkpointing"):  # a transformers layer: does it checkpoint this call?
            if not (module.gradient_checkpointing and module.training and torch.is_grad_enabled()):
                return
        # The checkpoint keeps the region's inputs alive until its backward, whichever mode it runs in.
        for t in _tensors((args, kwargs)):
            self._add(t, self._storages)
        # Like transformers under checkpointing, the measuring run leaves any KV cache alone.
        kwargs = {k: None if hasattr(v, "get_seq_length") else v for k, v in kwargs.items()}
        self._calls[id(module)] = (args, kwargs)

    def _after_region(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        call = self._calls.pop(id(module), None)
        if call is None:
            return
        self._measured.add(id(module))
        self._region_bytes.append(self._measure_region(module, *call))

    def _measure_region(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> int:
        """Bytes the region saves beyond what is already counted, from one uncheckpointed run of it."""
        devices = sorted({t.device.index or 0 for t in _tensors((args, kwargs)) if t.device.type == "cuda"})
        switch = hasattr(module, "gradient_checkpointing")
        self._rerun = {}
        try:
            with torch.random.fork_rng(devices=devices), torch.enable_grad():
                if switch:
                    module.gradient_checkpointing = False
                try:
                    with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                        module.forward(*args, **kwargs)
                finally:
                    if switch:
                        module.gradient_checkpointing = True
            return sum(s.nbytes() for key, s in self._rerun.items() if key not in self._storages)
        finally:
            self._rerun = None

    @property
    def outer_bytes(self) -> int:
        """Bytes saved outside checkpointed regions (their inputs included)."""
        return sum(s.nbytes() for s in self._storages.values())

    def outer_bytes_with_last_dim(self, size: int) -> int:
        """Of ``outer_bytes``, the storages first saved through a tensor whose last dimension is ``size`` (with the
        vocabulary size: the logits and the loss's copies of them)."""
        return sum(s.nbytes() for key, s in self._storages.items() if self._last_dims.get(key) == size)

    @property
    def region_bytes(self) -> list[int]:
        """Per checkpointed region, in call order: bytes its recomputation saves beyond its inputs."""
        return list(self._region_bytes)

    @property
    def total_bytes(self) -> int:
        """Peak saved bytes: everything outside checkpointed regions plus the largest region."""
        return self.outer_bytes + max(self._region_bytes, default=0)

    @property
    def num_storages(self) -> int:
        return len(self._storages)

    def __enter__(self) -> SavedTensorMeter:
        for module in self._regions:
            self._handles.append(module.register_forward_pre_hook(self._before_region, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._after_region, with_kwargs=True))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._calls.clear()
        self._storages = {key: _Released(nbytes=s.nbytes()) for key, s in self._storages.items()}


class _Released:
    """Stands in for a storage after the meter exits, so the memory is freed but the size is kept."""

    def __init__(self, nbytes: int) -> None:
        self._nbytes = nbytes

    def nbytes(self) -> int:
        return self._nbytes


def saved_activation_bytes(
    step_fn: Callable[[], Any],
    *,
    exclude: nn.Module | Iterable[torch.Tensor] | None = None,
    checkpointed: Iterable[nn.Module] | None = None,
) -> int:
    """Peak bytes of tensors saved for backward while ``step_fn()`` runs, deduplicated by storage.

    ``step_fn`` is typically one forward pass plus ``loss.backward()``. Pass the model as ``exclude`` so
    its parameter and buffer storages are never counted (parameters are never counted in any case) and its
    gradient-checkpointed layers are found; ``checkpointed`` names checkpointed modules of other models.
    """
    with SavedTensorMeter(exclude=exclude, checkpointed=checkpointed) as meter:
        step_fn()
    return meter.total_bytes
