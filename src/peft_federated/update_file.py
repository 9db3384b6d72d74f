"""A client's update file read piece by piece, for aggregation that streams over the pieces.

`safetensors.torch.load_file` maps the whole file and touches every page of it; aggregating K such
files client after client streams each update and the running means through main memory. Reading a
piece at a time instead lets the aggregator take one piece of every client in turn while that
piece's running mean stays in the CPU cache (`Aggregator.accept_files`), so each client byte crosses
memory about once: a tensor (`UpdateFile.read`, one `pread` into a reused buffer), or a run of
back-to-back tensors where it lies in the page cache (`UpdateFile.view_range`, mapped, then
`release`d), so the server's resident memory stays near one adapter whatever the number of clients.

The header is parsed and checked up front: names, dtypes and shapes can be validated before any
value is read, and a truncated or corrupt file is refused with the client named.
"""

from __future__ import annotations

import functools
import json
import math
import mmap
import os
import struct
import threading
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, NamedTuple, Optional

import torch
from torch import Tensor

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit
# A page fault on a mapped file maps more than its page: the large folio holding it (up to 2 MiB) or
# Linux's fault-around window. Releasing a range takes that much on either side, or the pages
# mapped beyond it would stay resident (measured: peak RSS grew with the number of files).
FAULT_AROUND_BYTES = 2 * 2**20


class TensorSpec(NamedTuple):
    """A tensor's dtype and shape as the file header declares them (enough for `check_update`)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int

    def dim(self) -> int:
        return len(self.shape)


def parse_header(raw: bytes) -> tuple[Mapping[str, TensorSpec], int]:
    """The tensors a safetensors header `raw` (the n bytes after the length) declares, and the end of
    their data, as absolute file offsets. Raises ValueError saying what is wrong (completing "the file
    ...")."""
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"has a header that is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise ValueError("has a header that is not a JSON object")
    specs, data_start = {}, 8 + len(raw)
    end = data_start
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = DTYPES[entry["dtype"]], tuple(entry["shape"]), entry["data_offsets"]
            nbytes = math.prod(shape) * dtype.itemsize
            ok = type(begin) is int and type(stop) is int and 0 <= begin and stop - begin == nbytes
            ok = ok and all(type(d) is int and d >= 0 for d in shape)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"has a malformed header entry for {name!r}: {str(entry)[:200]}") from None
        if not ok:
            raise ValueError(f"declares {name!r} as {entry['dtype']}{list(shape)} in bytes {entry['data_offsets']}, "
                             f"which is not {nbytes} bytes")
        specs[name] = TensorSpec(dtype, shape, data_start + begin, nbytes)
        end = max(end, data_start + stop)
    return MappingProxyType(specs), end


# A round's update files, written by the same code for the same adapter, mostly share one header,
# then parsed once per process (a 256-tensor header takes about as long to parse as 10 MB to average).
_parse_cached = functools.lru_cache(maxsize=16)(parse_header)
CACHED_HEADER_BYTES = 2**20  # larger headers are parsed each time, never kept


class UpdateFile:
    """An update's safetensors file: its header checked on opening, its tensors read on demand.

    Raises ValueError (naming the client and what to do) when the file is truncated or its header
    is not a valid safetensors header. Use as a context manager, or call `close()`.
    """

    def __init__(self, path: str | os.PathLike, client_id: str = "?", round: int = -1) -> None:
        self.path, self.client_id, self.round, self._fd = Path(path), client_id, round, -1
        self._mmap: Optional[mmap.mmap] = None
        self._mapped: Optional[Tensor] = None
        self._map_lock = threading.Lock()  # the aggregator's workers view ranges of one file at once
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self.specs = self._read_header()
        except BaseException:
            self.close()
            raise

    def _refuse(self, reason: str) -> ValueError:
        return ValueError(f"Update of {self.client_id!r} for round {self.round}: {self.path.name} is not a readable "
                          f"safetensors file: it {reason}. The client must resubmit it.")

    def _read_header(self) -> Mapping[str, TensorSpec]:
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            raise self._refuse(f"is {size} bytes long, too short for a safetensors header (truncated?)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise self._refuse(f"declares a {n}-byte header in a {size}-byte file (truncated or not safetensors)")
        raw = os.pread(self._fd, n, 8)
        if len(raw) < n:
            raise self._refuse(f"ended at byte {8 + len(raw)}, inside its {n}-byte header (truncated)")
        try:
            specs, end = (_parse_cached if n <= CACHED_HEADER_BYTES else parse_header)(raw)
        except ValueError as err:
            raise self._refuse(str(err)) from None
        if end > size:
            raise self._refuse(f"is {size} bytes long but its header places tensor data up to byte {end} (truncated)")
        self.data_start = 8 + n
        return specs

    def layout(self) -> tuple[tuple[str, torch.dtype, tuple[int, ...], int], ...]:
        """(name, dtype, shape, offset in the data section) of every tensor, in file order: two files
        with the same layout hold the same tensors at the same places, whatever their metadata."""
        return tuple((name, s.dtype, s.shape, s.start - self.data_start)
                     for name, s in sorted(self.specs.items(), key=lambda kv: kv[1].start))

    def read_range(self, start: int, buffer: Tensor) -> Tensor:
        """Fill the uint8 `buffer` with the file's bytes from `start` (an absolute offset) on, in one
        `pread`: the raw bytes of a run of tensors that lie back to back."""
        got = os.preadv(self._fd, [memoryview(buffer.numpy())], start) if buffer.numel() else 0
        if got != buffer.numel():
            raise self._refuse(f"ended at byte {start + got}, inside its tensor data (truncated)")
        return buffer

    def read(self, name: str, buffer: Optional[Tensor] = None) -> Tensor:
        """The tensor `name`, read from the file (nothing is memory-mapped): into a new tensor, or into
        `buffer` (a uint8 tensor of at least its size, reused from read to read: the returned tensor is
        a view of it, valid until the buffer's next read)."""
        spec = self.specs[name]
        if buffer is None or buffer.numel() < spec.nbytes:
            out = torch.empty(spec.shape, dtype=spec.dtype)
        else:
            out = buffer[: spec.nbytes].view(spec.dtype).view(spec.shape)
        self.read_range(spec.start, out.view(-1).view(torch.uint8))
        return out

    def view_range(self, start: int, nbytes: int) -> Tensor:
        """The file's bytes [start, start + nbytes) as a uint8 tensor over a memory mapping of the file:
        no copy, the page cache's own pages (mapped private, so nothing can write to the file). The
        file's size is checked first, so a file cut short since it was opened is refused here rather
        than fault when read; a file changed in place while its view is in use is not detected (the
        stores never change a file in place: they replace it). `release` the range when done."""
        if (size := os.fstat(self._fd).st_size) < start + nbytes:
            raise self._refuse(f"is now {size} bytes long, shorter than when it was opened (truncated)")
        with self._map_lock:  # one mapping per file, however many workers ask for it first
            if self._mapped is None:
                self._mmap = mmap.mmap(self._fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
                self._mapped = torch.frombuffer(self._mmap, dtype=torch.uint8)
            return self._mapped[start: start + nbytes]

    def release(self, start: int, nbytes: int) -> None:
        """Unmap the pages of [start, start + nbytes) and of their neighbours that reading it mapped
        (they stay in the page cache): the process's resident memory keeps to the ranges in use,
        whatever the number and size of the files."""
        if self._mmap is not None and nbytes:
            first = max(0, start - FAULT_AROUND_BYTES) // mmap.PAGESIZE * mmap.PAGESIZE
            self._mmap.madvise(mmap.MADV_DONTNEED, first, min(start + nbytes + FAULT_AROUND_BYTES, len(self._mmap)) - first)

    def close(self) -> None:
        self._mapped = None
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # a view handed out is still alive: the mapping goes with it
                pass
            self._mmap = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "UpdateFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self.close()
