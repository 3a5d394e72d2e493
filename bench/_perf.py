"""Measuring time and peak memory the same way on CPU and GPU, for the benchmarks in bench/.

    with PeakMemory(device) as mem:
        loss = model(...).loss
        loss.backward()
    print(mem.peak_bytes)  # the most bytes held at once by tensors made inside the block

On CUDA this is `torch.cuda.max_memory_allocated` less what was allocated when the block began. On CPU
there is no such counter (and the process RSS never goes down), so a dispatch mode counts the bytes of
every tensor storage an operator creates inside the block, forward and backward alike, and forgets it when
the storage is freed: activations saved for backward, gradients and temporaries are all seen, tensors that
existed before the block (weights, inputs) are not. The mode costs Python time per operator: time a block
without it.
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _LiveStorageBytes(TorchDispatchMode):
    """Counts the bytes of storages created by operators while active, until each is freed."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}  # storage data_ptr -> nbytes
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # Outputs that alias an input (views, in-place and out= results) allocate nothing.
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage.data_ptr() not in inputs:
                    self._track(storage)
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or ptr in self.live:  # empty, or already counted
            return
        self.live[ptr] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        # Storages keep their Python object while the C++ storage lives (also when only autograd holds it),
        # so this runs when the memory goes back to the allocator.
        weakref.finalize(storage, self._free, ptr)

    def _free(self, ptr: int) -> None:
        self.current -= self.live.pop(ptr, 0)


class PeakMemory:
    """Context manager: `peak_bytes` is the most memory held at once by tensors allocated inside it."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.peak_bytes = 0
        self._mode: _LiveStorageBytes | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._mode = _LiveStorageBytes()
            self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            assert self._mode is not None
            self._mode.__exit__(*exc)
            self.peak_bytes = self._mode.peak


def synchronize(device: str | torch.device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_times(fn: Callable[[], object], device: str | torch.device, repeats: int = 3, warmup: int = 1,
               deadline: float | None = None) -> list[float]:
    """Wall times of `fn()` in seconds (device synchronised) after `warmup` calls: `repeats` of them, fewer
    when `deadline` (time.monotonic) comes first, at least one."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    while len(times) < repeats and (deadline is None or not times or time.monotonic() < deadline):
        t0 = time.perf_counter()
        fn()
        synchronize(device)  # device->host sync: the time must include the queued kernels
        times.append(time.perf_counter() - t0)
    return times


def time_it(fn: Callable[[], object], device: str | torch.device, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of `fn()` in seconds over `repeats` runs after `warmup` runs (device synchronised)."""
    return statistics.median(wall_times(fn, device, repeats, warmup))


def time_interleaved(fns: dict[str, Callable[[], object]], device: str | torch.device, repeats: int = 3,
                     warmup: int = 1) -> dict[str, float]:
    """Median wall time of each `fn()`, the functions taking turns (a, b, a, b, ...) so that a change in
    the machine's load (shared CPUs) hits all of them alike and their ratios stay meaningful."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            synchronize(device)  # device->host sync: the time must include the queued kernels
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_memory(fn: Callable[[], object], device: str | torch.device) -> int:
    """Peak bytes held by tensors allocated during one call of `fn()`."""
    with PeakMemory(device) as mem:
        fn()
    return mem.peak_bytes


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover
