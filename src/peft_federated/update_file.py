"""A client's update file read piece by piece, for aggregation that streams over the pieces.

`safetensors.torch.load_file` maps the whole file and touches every page of it; aggregating K such
files client after client streams each update and the running means through main memory. Reading a
piece at a time instead lets the aggregator take one piece of every client in turn while that
piece's running mean stays in the CPU cache (`Aggregator.accept_files`), so each client byte crosses
memory about once: a tensor (`UpdateFile.read`, one `pread` into a reused buffer), or a run of
back-to-back tensors where it lies in the page cache (`UpdateFile.view_range`, mapped, then
`release`d), so the server's resident memory stays near one adapter whatever the number of clients.

The header is parsed and checked up front, as strictly as the safetensors library checks it
(`parse_header`): names, dtypes and shapes can be validated before any value is read, and a
truncated, padded or malformed file is refused with the client named.
"""

from __future__ import annotations

import functools
import json
import math
import mmap
import operator
import os
import re
import struct
import threading
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, NamedTuple, Optional

import torch
from torch import Tensor

# Every dtype safetensors knows, with its size in bits (its `Dtype::bitsize`), and the torch dtype its
# `safe_open(..., "pt")` reads it as (F4 packed two to a byte, the last size halved); F6 it cannot read.
BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32,
    "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
_TORCH_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2": "float8_e5m2", "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu", "F4": "float4_e2m1fn_x2", "C64": "complex64", "U64": "uint64", "U32": "uint32",
    "U16": "uint16",
}
DTYPES = {code: getattr(torch, name) for code, name in _TORCH_NAMES.items() if hasattr(torch, name)}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit (`MAX_HEADER_SIZE`)
MAX_JSON_DEPTH = 127  # nesting its JSON parser (serde_json) accepts
_U64 = 2**64
_I64 = 2**63
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


# A JSON object parses to a tuple of its (key, value) pairs in order (duplicate keys are kept, to be
# refused), an array to a list.
_Object = tuple


def _number(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"a number out of range ({text[:20]}...)")
    return value


def _integer(text: str) -> int | float:
    """A JSON integer as safetensors' parser reads it: 0 <= n < 2**64 an int; negative (even -0) or
    larger, a float (which no size or offset may be)."""
    if text[0] != "-" and len(text) <= 20 and (value := int(text)) < _U64:
        return value
    return _number(text)


def _constant(text: str):
    raise ValueError(f"{text}, which is not JSON")


# Headers without a minus sign (all that safetensors' writers produce) parse with Python's own numbers:
# those of sizes and offsets then read as safetensors' do (`_sizes`), and those of unknown fields are
# checked where they are walked (`_check_unknown`). Others parse with the hooks above ("-0" is a float).
_PLAIN = json.JSONDecoder(object_pairs_hook=_Object)
_STRICT = json.JSONDecoder(object_pairs_hook=_Object, parse_int=_integer, parse_float=_number, parse_constant=_constant)
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")
TENSOR_FIELDS = ("dtype", "shape", "data_offsets")
_OFFSETS = operator.itemgetter(0, 1)


def _decode(raw: bytes) -> _Object:
    """The JSON document `raw`, refused where safetensors' JSON parser (serde_json) would refuse it
    though Python's accepts it: non-finite numbers, unpaired surrogate escapes (such as \\ud800) in
    strings, nesting deeper than about 1000 levels (`_check_unknown` sees to the rest)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"has a header that is not UTF-8 ({err})") from None
    try:
        document = (_STRICT if b"-" in raw else _PLAIN).decode(text)
    except RecursionError:
        raise ValueError(f"has a header nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as err:  # json.JSONDecodeError, or a hook's refusal
        raise ValueError(f"has a header that is not valid JSON ({err})") from None
    if (b"\\ud" in raw or b"\\uD" in raw) and _SURROGATE.search(raw):
        _check_strings(document)
    return document


def _nodes(node: list | tuple):
    """The values of a JSON array or object (`_Object`), keys included."""
    return (x for pair in node for x in pair) if type(node) is _Object else iter(node)


def _check_strings(document: _Object) -> None:
    """Refuse a string (key or value, anywhere) holding an unpaired surrogate."""
    stack = [document]
    while stack:
        for value in _nodes(stack.pop()):
            if isinstance(value, (list, tuple)):
                stack.append(value)
            elif type(value) is str and not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError(f"has a header string with an unpaired surrogate: {value[:60]!r}") from None


def _check_unknown(name: str, value, depth: int = 3) -> None:
    """Refuse `value`, an unknown field of tensor `name`'s entry (safetensors parses, then ignores
    it), if it nests deeper than `MAX_JSON_DEPTH` or holds a number its parser finds out of range.
    No other part of a header it accepts can nest, or hold a number but a size."""
    stack = [(value, depth)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (list, tuple)):
            if depth > MAX_JSON_DEPTH:
                raise ValueError(f"has a header nested deeper than {MAX_JSON_DEPTH} levels (in tensor {name!r})")
            stack.extend((x, depth + 1) for x in _nodes(node))
        elif type(node) is float and not math.isfinite(node) or type(node) is int and abs(node) >= _U64 and _huge(node):
            raise ValueError(f"has a number out of range in its entry for tensor {name!r}")


def _huge(value: int) -> bool:
    try:
        float(value)
    except OverflowError:
        return True
    return False


def _sizes(values) -> bool:
    """Whether `values` is a list of sizes or offsets as safetensors reads them: ints in [0, 2**64)."""
    return (type(values) is list and all(type(v) is int for v in values)
            and (not values or (min(values) >= 0 and max(values) < _U64)))


def _entry(name: str, entry) -> tuple[str, list, list]:
    """(dtype code, shape, data_offsets) of a tensor entry: an object with these three fields (others
    ignored) or a list of the three, as safetensors reads a `TensorInfo`."""
    if type(entry) is _Object:
        fields = dict(entry)
        if len(entry) > 3:  # unknown fields (ignored, but parsed), or a field given twice
            for key in TENSOR_FIELDS:
                if sum(k == key for k, _ in entry) > 1:
                    raise ValueError(f"gives {key!r} twice for tensor {name!r}")
            for key, value in entry:
                if key not in TENSOR_FIELDS:
                    _check_unknown(name, value)
        if not all(key in fields for key in TENSOR_FIELDS):
            raise ValueError(f"has no {[k for k in TENSOR_FIELDS if k not in fields]} for tensor {name!r}")
        dtype, shape, offsets = fields["dtype"], fields["shape"], fields["data_offsets"]
    elif type(entry) is list and len(entry) == 3:
        dtype, shape, offsets = entry
    else:
        raise ValueError(f"has a malformed header entry for tensor {name!r}: {str(entry)[:200]}")
    if type(dtype) is _Object and len(dtype) == 1 and dtype[0][1] is None:  # the enum as {"F32": null}
        dtype = dtype[0][0]
    if type(dtype) is not str or dtype not in BITS:
        raise ValueError(f"declares tensor {name!r} with dtype {str(dtype)[:40]}, which safetensors does not know")
    if not _sizes(shape):
        raise ValueError(f"declares tensor {name!r} with shape {str(shape)[:100]}, not a list of sizes")
    if not _sizes(offsets) or len(offsets) != 2:
        raise ValueError(f"declares tensor {name!r} at data_offsets {str(offsets)[:100]}, not two offsets")
    return dtype, shape, offsets


def _nbytes(name: str, code: str, shape: list) -> tuple[int, list]:
    """The bytes of a tensor of `shape` and dtype `code`, computed as safetensors does (refused where
    its 64-bit products overflow), and the shape torch holds it in (refused where it cannot)."""
    count = 1
    for d in shape:  # in order: an overflow before a zero still overflows
        count *= d
        if count >= _U64:
            raise ValueError(f"declares tensor {name!r} with shape {shape}, whose size overflows")
    bits = count * BITS[code]
    if bits >= _U64 or bits % 8:
        raise ValueError(f"declares tensor {name!r} with shape {shape} of {code}, not a whole number of bytes")
    if code not in DTYPES:
        raise ValueError(f"declares tensor {name!r} as {code}, a dtype torch cannot hold")
    if code == "F4":  # two values a byte: the last size halves
        if not shape or shape[-1] % 2:
            raise ValueError(f"declares tensor {name!r} as F4{shape}, whose last size is not even")
        shape = [*shape[:-1], shape[-1] // 2]
    stride = 1
    for d in shape[1:]:  # torch's contiguous strides (each size counted at least 1) and sizes are int64
        stride *= max(d, 1)
    if stride >= _I64 or max(shape, default=0) >= _I64:
        raise ValueError(f"declares tensor {name!r} with shape {shape}, too large for a torch tensor")
    return bits // 8, shape


def _plain_entry(entry) -> Optional[tuple[int, int, str, list, int]]:
    """(begin, end, dtype code, shape, bytes) of a tensor entry as safetensors' writers write it (its
    three fields in their order, a dtype torch holds, no zero or huge size), checked; None for any
    other entry (`_entry` and `_nbytes` decide). Numbers are ints >= 0 here (see `_PLAIN`)."""
    if type(entry) is not _Object or len(entry) != 3:
        return None
    (k1, code), (k2, shape), (k3, offsets) = entry
    if (k1 != "dtype" or k2 != "shape" or k3 != "data_offsets" or type(code) is not str or code not in DTYPES or code == "F4"
            or type(shape) is not list or type(offsets) is not list or len(offsets) != 2):
        return None
    begin, stop = offsets
    if type(begin) is not int or type(stop) is not int or stop >= _U64 or not all(type(d) is int for d in shape):
        return None
    count = math.prod(shape)
    if count == 0 or count * BITS[code] >= _I64:  # a zero size or a huge one: `_nbytes`'s checks decide
        return None
    return begin, stop, code, shape, count * BITS[code] // 8


def parse_header(raw: bytes) -> tuple[Mapping[str, TensorSpec], int]:
    """The tensors a safetensors header `raw` (the n bytes after the length) declares, and the end of
    their data, as absolute file offsets. Accepts exactly the headers the safetensors library accepts
    (its Rust validation: UTF-8 JSON object, `__metadata__` a string -> string map, known dtypes,
    sizes that match shape and dtype, data offsets that tile the data section from 0 without gap or
    overlap), less those with a tensor name given twice (safetensors keeps the last, so one entry
    would be read over another's bytes) or a tensor torch cannot hold. The file must end where the
    data ends (`UpdateFile` checks). Raises ValueError saying what is wrong (completing "the file ...")."""
    document = _decode(raw)
    if type(document) is not _Object:
        raise ValueError("has a header that is not a JSON object")
    entries, metadata_seen = [], False
    for name, entry in document:
        if name == "__metadata__":
            if metadata_seen:
                raise ValueError("gives __metadata__ twice")
            metadata_seen = True
            if entry is not None and (type(entry) is not _Object or any(type(v) is not str for _, v in entry)):
                raise ValueError(f"has __metadata__ that is not a map of strings to strings: {str(entry)[:200]}")
            continue
        plain = _plain_entry(entry)
        if plain is None:
            code, shape, (begin, stop) = _entry(name, entry)
            plain = (begin, stop, name, code, shape, None)
        else:
            plain = (*plain[:2], name, *plain[2:])
        entries.append(plain)
    entries.sort(key=_OFFSETS)
    specs, data_start, end = {}, 8 + len(raw), 0
    for begin, stop, name, code, shape, nbytes in entries:
        if name in specs:
            raise ValueError(f"declares tensor {name!r} twice")
        if begin != end or stop < begin:
            raise ValueError(f"places tensor {name!r} at bytes {[begin, stop]} of its data, not at {end}, where the "
                             "tensor before it ends (tensors must tile the data without gap or overlap)")
        if nbytes is None:
            nbytes, shape = _nbytes(name, code, shape)
        if stop - begin != nbytes:
            raise ValueError(f"declares {name!r} as {code}{shape} in bytes {[begin, stop]}, which is not {nbytes} bytes")
        specs[name] = TensorSpec(DTYPES[code], tuple(shape), data_start + begin, nbytes)
        end = stop
    return MappingProxyType(specs), data_start + end


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
        if end < size:
            raise self._refuse(f"has {size - end} bytes after its last tensor's data, which no tensor of its header "
                               "points at (safetensors refuses such a file)")
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
