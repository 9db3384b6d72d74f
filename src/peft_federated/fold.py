"""The fold: running weighted means, and a round's update files streamed into them piece by piece.

`WeightedMean` is the running mean every strategy's server side builds on (`Aggregator.accept` folds
one update into it at a time). The rest serves `Aggregator.accept_files`, which folds a round's
update files together (`FileUpdate`, each an `UpdateFile` with its client's weight):

- a plain weighted mean of files laid out alike goes by runs of tensors that lie back to back in
  every file, about `RUN_BYTES` each (`plan_runs`, `fold_runs`): each run of every client in turn is
  read where it lies in the page cache (mapped, then released) while that run's means stay in the
  CPU cache, by one `lerp_` per tensor, as `WeightedMean.add` (the same result, bit for bit); the
  means go on huge pages (`empty_huge`);
- anything else goes module by module (`fold_modules`), each tensor read into a reused buffer;
- either way in worker threads, each taking a contiguous share of the work (`in_workers`).

Which of the two a round takes, and what to do about a client whose values are refused, is the
aggregator's business (`peft_federated.strategies.base.Aggregator`); this module knows no strategy.
"""

from __future__ import annotations

import math
import mmap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from peft_federated.state import lora_key
from peft_federated.strategies.validation import InvalidUpdateError, all_finite, clip_change
from peft_federated.update_file import UpdateFile

RUN_BYTES = 4 * 2**20  # a run of a plain mean's fold: its means and one client's copy of it stay in cache
HUGE_PAGE_BYTES = 2 * 2**20  # means of at least this size go on huge pages (`empty_huge`)


class WeightedMean:
    """Running weighted mean sum_k w_k x_k / sum_k w_k, updated in place one x at a time.

    Kept as the mean itself (mean += w_k / W_k * (x_k - mean), one `lerp_`), not as a sum: one
    accumulator the size of x and no temporary per update, so a server round reads each update once
    and its memory does not grow with the number of clients; and the mean of identical inputs (or of
    one input) is that input, bit for bit. Accumulated in float32, or in the input's dtype when wider.
    """

    def __init__(self) -> None:
        self.mean: Optional[Tensor] = None
        self.total = 0.0
        self._given = False  # `mean` itself was handed out by `value`: copy it before changing it

    def add(self, x: Tensor, weight: float) -> None:
        self.total += weight
        if self._given and self.mean is not None:
            self.mean, self._given = self.mean.clone(), False
        if self.mean is None:
            self.mean = x.to(self.accumulates_in(x.dtype), copy=True)
        elif self.total > 0:  # a zero weight while the total is still zero: nothing to move
            self.mean.lerp_(x.to(self.mean.dtype), weight / self.total)

    @staticmethod
    def accumulates_in(dtype: torch.dtype) -> torch.dtype:
        """The dtype of the mean of inputs of `dtype`: float32, or the input's dtype when wider."""
        return torch.promote_types(dtype, torch.float32)

    @property
    def sum(self) -> Optional[Tensor]:
        """sum_k w_k x_k (None before the first x), computed from the mean."""
        return None if self.mean is None else self.mean * self.total

    def value(self, dtype: torch.dtype) -> Tensor:
        if self.mean is None:
            raise ValueError("No update was accepted.")
        if self.total == 0:  # every weight was zero (e.g. HetLoRA norms of all-zero updates)
            raise ZeroDivisionError("All aggregation weights are zero.")
        if self.mean.dtype != dtype:
            return self.mean.to(dtype)
        self._given = True  # no copy of a whole adapter per round; a later `add` copies instead
        return self.mean



def empty_huge(numel: int, dtype: torch.dtype) -> Tensor:
    """An uninitialised 1-D tensor on its own anonymous mapping advised for transparent huge pages
    (where Linux offers them): first written 2 MiB at a page fault, not 4 KiB. A round's means are
    about an adapter of fresh memory; faulted in by 4 KiB pages they cost about as much as folding
    in one more client. Tensors under 2 MiB, and other systems, get `torch.empty`."""
    if numel * dtype.itemsize < HUGE_PAGE_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(numel, dtype=dtype)
    region = mmap.mmap(-1, numel * dtype.itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(region, dtype=dtype, count=numel)  # the tensor keeps the mapping alive


def single_threaded(fn, *args) -> None:
    """`fn(*args)` with torch's own intra-op threads off in this (worker) thread: the workers already
    share the cores, and each splitting its small kernels over every core only makes them wait on
    each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fn(*args)
    finally:
        torch.set_num_threads(before)


@dataclass
class MeanRun:
    """Tensors of one dtype that lie back to back in every update file of a round, from `offset` in
    the data section on: (name, shape, the `WeightedMean` it feeds) each."""

    offset: int
    dtype: torch.dtype
    nbytes: int = 0
    tensors: list = field(default_factory=list)

    @property
    def sizes(self) -> list[int]:
        return [math.prod(shape) for _, shape, _ in self.tensors]

    @property
    def mean_dtype(self) -> torch.dtype:
        return WeightedMean.accumulates_in(self.dtype)


@dataclass
class FileUpdate:
    """One client's update file opened for the fold (by `Aggregator.open_files`)."""

    client_id: str
    file: UpdateFile
    num_samples: int
    rank: int
    weight: float
    norm: Optional[float] = None  # change-norm, once measured
    checked: bool = False  # every value read and found finite

    def read(self, key: str, buffer: Optional[Tensor] = None) -> Tensor:
        try:
            value = self.file.read(key, buffer)
        except ValueError as err:  # the file changed under us (truncated since it was opened)
            raise InvalidUpdateError(self.client_id, self.file.round, str(err)) from None
        if not self.checked and not all_finite(value):
            raise InvalidUpdateError(self.client_id, self.file.round, f"{key} holds NaN or Inf values.")
        return value

    def view_run(self, run: MeanRun) -> Tensor:
        """This update's values of `run`, one flat tensor mapped from the file (values unchecked)."""
        try:
            return self.file.view_range(self.file.data_start + run.offset, run.nbytes).view(run.dtype)
        except ValueError as err:  # the file changed under us (truncated since it was opened)
            raise InvalidUpdateError(self.client_id, self.file.round, str(err)) from None

    def release_run(self, run: MeanRun) -> None:
        self.file.release(self.file.data_start + run.offset, run.nbytes)


def plan_runs(updates: list[FileUpdate], means: Mapping[str, WeightedMean]) -> Optional[list[MeanRun]]:
    """The work of a plain weighted mean of `updates` into `means` (tensor name -> its mean) as runs of
    tensors of one dtype, back to back in every file, each about `RUN_BYTES` long; None unless all
    files share one layout (the same tensors at the same offsets)."""
    layout = updates[0].file.layout()
    if any(u.file.specs is not updates[0].file.specs and u.file.layout() != layout for u in updates[1:]):
        return None
    runs: list[MeanRun] = []
    for name, dtype, shape, offset in layout:
        nbytes = math.prod(shape) * dtype.itemsize
        run = runs[-1] if runs else None
        if run is None or run.offset + run.nbytes != offset or run.nbytes + nbytes > RUN_BYTES or run.dtype != dtype:
            runs.append(run := MeanRun(offset, dtype))
        run.tensors.append((name, shape, means[name]))
        run.nbytes += nbytes
    return runs


def fold_runs(updates: list[FileUpdate], runs: list[MeanRun]) -> None:
    """Each run of every client in turn, read where it lies in the page cache (`UpdateFile.view_range`:
    mapped, not copied) by one `lerp_` per tensor, as `WeightedMean.add` does (so bit for bit the
    same result), then unmapped. Values are checked once per run, on the running means: NaN or Inf
    in any client's values leaves them non-finite, and only then are the clients' copies of that
    run checked to find whose it was."""
    wide = None  # narrow values widened to float32 first, as WeightedMean.add does
    needed: dict[torch.dtype, int] = {}  # the means of all these runs, per dtype, in one allocation
    for run in runs:
        needed[run.mean_dtype] = needed.get(run.mean_dtype, 0) + sum(run.sizes)
    free = {dtype: empty_huge(numel, dtype) for dtype, numel in needed.items()}
    for run in runs:
        sizes, mean_dtype = run.sizes, run.mean_dtype
        if mean_dtype != run.dtype and wide is None:
            wide = torch.empty(max(sum(r.sizes) for r in runs), dtype=torch.float32)
        widened = wide[: sum(sizes)] if mean_dtype != run.dtype else None
        flat, free[mean_dtype] = free[mean_dtype][: sum(sizes)], free[mean_dtype][sum(sizes):]
        means = list(flat.split(sizes))
        total = 0.0
        for i, u in enumerate(updates):
            values = u.view_run(run)
            total += u.weight
            if i == 0:
                torch._foreach_copy_(means, values.split(sizes))
            elif total > 0:  # as WeightedMean.add: a zero weight while the total is zero moves nothing
                if widened is not None:
                    values = widened.copy_(values)
                torch._foreach_lerp_(means, values.split(sizes), u.weight / total)
            u.release_run(run)
        if not all(u.checked for u in updates) and not all(all_finite(m) for m in means):
            find_nonfinite(updates, run)
        for (_, shape, mean), value in zip(run.tensors, means):
            mean.mean, mean.total = value.view(shape), total


def find_nonfinite(updates: list[FileUpdate], run: MeanRun) -> None:
    """Raise for the first client whose copy of `run` holds NaN or Inf (none may: finite values
    whose mean overflowed, as `accept` would give too)."""
    for u in updates:
        if not u.checked:
            for (name, _, _), x in zip(run.tensors, u.view_run(run).split(run.sizes)):
                if not all_finite(x):
                    raise InvalidUpdateError(u.client_id, u.file.round, f"{name} holds NaN or Inf values.")
            u.release_run(run)


def fold_modules(updates: list[FileUpdate], tasks: Sequence[tuple[str, object]], clip: Mapping[str, dict],
                 bound: Optional[float]) -> None:
    """Each task's copy of every client in turn, read tensor by tensor: a task is (key, `WeightedMean`)
    for an extra tensor, or (module, its aggregator) for a LoRA module, fed (A, B, weight). A client in
    `clip` (client id -> its start tensors) has its values clipped to change-norm `bound` first."""
    buffers = [torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8)]  # this worker's, reused

    def read(u: FileUpdate, keys: tuple[str, ...]) -> list[Optional[Tensor]]:
        values = {}
        for slot, k in enumerate(keys):
            if k in u.file.specs:
                if buffers[slot].numel() < u.file.specs[k].nbytes:
                    buffers[slot] = torch.empty(u.file.specs[k].nbytes, dtype=torch.uint8)
                values[k] = u.read(k, buffers[slot])
        if u.client_id in clip:
            values = clip_change(values, clip[u.client_id], u.norm, bound)
        return [values.get(k) for k in keys]

    for name, agg in tasks:
        if isinstance(agg, WeightedMean):
            for u in updates:
                agg.add(*read(u, (name,)), u.weight)
        else:
            keys = (lora_key(name, "lora_A"), lora_key(name, "lora_B"))
            for u in updates:
                agg.accept(*read(u, keys), u.weight)


def in_workers(fold: Callable[[list], None], tasks: list, threads: int) -> None:
    """`fold(share)` for contiguous shares of `tasks`, in `threads` workers: each tensor still sees the
    clients in order, so the result does not depend on the number of workers. Reads and torch kernels
    release the GIL, so one worker's reads overlap another's arithmetic. Re-raises a worker's error
    (an `InvalidUpdateError` for a client found non-finite)."""
    workers = max(1, min(threads, len(tasks)))
    if workers == 1:
        return fold(tasks)
    shares = [tasks[len(tasks) * i // workers: len(tasks) * (i + 1) // workers] for i in range(workers)]
    with ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(single_threaded, fold, share) for share in shares]:
            future.result()
