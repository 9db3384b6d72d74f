"""An update file is read only if the safetensors library would read it: crafted files, valid and
malformed in every way we know of, go through `UpdateFile` and through `safetensors.safe_open`, and
both accept or both refuse each one (a tensor name given twice excepted: the library keeps the last
entry, we refuse the file)."""

from __future__ import annotations

import json
import random
import struct
from collections import Counter

import pytest
import torch
from conftest import RUN_SEED
from helpers import make_config
from safetensors import safe_open
from safetensors.torch import save_file
from test_invariants import random_state, random_update

from peft_federated import get_strategy
from peft_federated.update_file import BITS, DTYPES, UpdateFile

NAMES = ["base_model.model.up.lora_A.weight", "a", "", "ü", "\U0001f600", 'q"uote', "back\\slash", "[x]", "{", "\x00",
         "__metadata", "dtype", "model.layers.0.self_attn.q_proj.lora_B.weight", "-1e5"]
KNOWN = sorted(DTYPES)  # what torch holds
UNREADABLE = sorted(set(BITS) - set(DTYPES)) + ["F4"]  # F6 (safetensors cannot read), F4 of odd sizes
MALFORMED = ["overlap", "partial_overlap", "gap", "trailing_bytes", "size", "dtype", "number", "missing_field",
             "field_twice", "metadata", "metadata_twice", "not_object", "bad_json", "non_finite", "surrogate",
             "deep", "truncated", "header_length", "padding", "huge_shape", "offsets", "entry_form"]
KINDS = ["valid", "duplicate_name", *MALFORMED]
BAD_NUMBERS = ["-0", "1.0", "true", "-1", "1e0", "null", "18446744073709551616", '"1"']


def library_reads(path) -> dict | None:
    """The tensors safetensors reads from the file, or None where it refuses it (its header, or a
    tensor torch cannot hold: it raises SafetensorError, or torch's or its binding's own errors)."""
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception:
        return None


def ours_reads(path) -> dict | None:
    try:
        with UpdateFile(path, "c7", 3) as f:
            return {k: f.read(k) for k in f.specs}
    except ValueError as err:  # a precise refusal: the client, the round, what to do
        assert str(err).startswith("Update of 'c7' for round 3: ") and "The client must resubmit it." in str(err), err
        return None


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


class Crafted:
    """A random safetensors file described piece by piece, then written with one kind of defect."""

    def __init__(self, rng: random.Random, kind: str) -> None:
        self.rng, self.kind = rng, kind
        n = rng.randint(1 if kind not in ("valid", "padding") else 0, 5)
        self.names = rng.sample(NAMES, n)
        self.tensors = []  # [name, code, shape, begin, end], in data order
        offset = 0
        for name in self.names:
            code = rng.choice(KNOWN)
            shape = [rng.choice([0, 1, 1, 2, 3, 5]) for _ in range(rng.randint(0, 3))]
            if code == "F4":  # two values a byte, read with the last size halved: it must be even
                shape.append(rng.choice([0, 2, 4]))
            size = BITS[code] * _prod(shape) // 8
            self.tensors.append([name, code, shape, offset, offset + size])
            offset += size
        self.data = bytes(rng.getrandbits(8) for _ in range(offset))
        self.metadata = rng.choice([None, "absent", {}, {"format": "pt"}, {"k": "v", "ü": "\n"}])
        self.unknown = rng.random() < 0.2  # extra fields in the entries (ignored by safetensors)
        self.header_prefix, self.header_suffix, self.file_suffix = "", "", b""

    def entry(self, code, shape, begin, end, form=None) -> str:
        rng = self.rng
        dtype = json.dumps(code) if rng.random() < 0.9 else '{%s: null}' % json.dumps(code)
        fields = [("dtype", dtype), ("shape", json.dumps(shape)), ("data_offsets", json.dumps([begin, end]))]
        form = form or ("object" if rng.random() < 0.9 else "array")
        if form == "array":
            return "[" + ", ".join(v for _, v in fields) + "]"
        if rng.random() < 0.3:
            rng.shuffle(fields)
        if self.unknown:
            fields.append(("x", rng.choice(["1", '"s"', "null", "[1, [2, {}]]", "{\"a\": 1, \"a\": 2}", "-3", "1.5e3",
                                            "12345678901234567890123", "-0"])))
        return "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in fields) + "}"

    def header(self, entries: list[str] | None = None) -> str:
        items = []
        if self.metadata != "absent":
            items.append(f'"__metadata__": {json.dumps(self.metadata)}')
        entries = entries if entries is not None else [self.entry(*t[1:]) for t in self.tensors]
        items += [f"{json.dumps(t[0], ensure_ascii=self.rng.random() < 0.5)}: {e}" for t, e in zip(self.tensors, entries)]
        order = list(range(len(items)))
        self.rng.shuffle(order)  # safetensors sorts entries by offsets: any order is valid
        return "{" + ", ".join(items[i] for i in order) + "}"

    def build(self) -> bytes:
        rng, kind, t = self.rng, self.kind, self.tensors
        data = self.data
        if kind == "overlap":  # a second tensor on the very bytes of another
            name, code, shape, begin, end = rng.choice(t)
            t.append([name + "'", code, shape, begin, end])
        elif kind == "partial_overlap":  # a tensor starting inside the one before it
            victim = rng.choice(t)
            victim[1], victim[2] = "U8", [victim[4] - victim[3] + 2]
            victim[3] = max(0, victim[3] - 1)
            victim[4] = victim[3] + victim[2][0]
            data += b"\0"
        elif kind == "gap":  # bytes no tensor points at, perhaps NaN
            i = rng.randrange(len(t))
            gap = rng.choice([1, 4, 8])
            for later in t[i:]:
                later[3] += gap
                later[4] += gap
            cut = t[i][3] - gap
            data = data[:cut] + struct.pack("<f", float("nan"))[:gap].ljust(gap, b"\xff") + data[cut:]
        elif kind == "duplicate_name":
            i, j = rng.sample(range(len(t)), 2) if len(t) > 1 else (0, None)
            if j is None:
                t.append([t[0][0], t[0][1], t[0][2], t[0][3], t[0][4]])
            else:
                t[j][0] = t[i][0]
        elif kind == "trailing_bytes":
            self.file_suffix = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 9)))
        elif kind == "size":  # a shape or dtype that does not fit its bytes
            victim = rng.choice(t)
            victim[2] = victim[2] + [2] if rng.random() < 0.5 else [d + 1 for d in victim[2]] or [2]
        elif kind == "dtype":
            rng.choice(t)[1] = rng.choice(["f32", "F17", "", "float32", "I128", *UNREADABLE, *UNREADABLE])
        elif kind == "huge_shape":  # sizes that overflow 64 bits, or torch's int64, around a zero
            rng.choice(t)[2] = rng.choice([[2**32, 2**32, 0], [0, 2**32, 2**32], [2**63, 0], [2**63 - 1, 0], [0, 3, 2**62],
                                           [0, 2**62, 1], [2**64 - 1, 0], [2**64, 0], [2**40, 0, 2**40]])
            t.sort(key=lambda e: e[3])
        header_entries = [self.entry(*e[1:]) for e in t]
        if kind in ("number", "missing_field", "field_twice", "offsets", "entry_form"):
            i = rng.randrange(len(t))
            _, code, shape, begin, end = t[i]
            bad = {
                "number": lambda: '{"dtype": %s, "shape": %s, "data_offsets": [%s, %d]}' % (
                    json.dumps(code), *rng.choice([
                        (f"[{rng.choice(BAD_NUMBERS)}]", str(begin)),
                        (json.dumps(shape), rng.choice(BAD_NUMBERS) if begin == 0 else f"{begin}.0")]), end),
                "missing_field": lambda: '{"dtype": %s, "data_offsets": %s}' % (json.dumps(code), json.dumps([begin, end])),
                "field_twice": lambda: '{"dtype": %s, "dtype": %s, "shape": %s, "data_offsets": %s}' % (
                    json.dumps(code), json.dumps(code), json.dumps(shape), json.dumps([begin, end])),
                "offsets": lambda: '{"dtype": %s, "shape": %s, "data_offsets": %s}' % (
                    json.dumps(code), json.dumps(shape), rng.choice([json.dumps([begin]), json.dumps([begin, end, end]),
                                                                      json.dumps({"0": begin, "1": end}), "null",
                                                                      json.dumps([end, begin]) if end > begin else "[0, 1]"])),
                "entry_form": lambda: rng.choice(["null", json.dumps(code), f"[{json.dumps(code)}, {json.dumps(shape)}]",
                                                  f"[{json.dumps(code)}, {json.dumps(shape)}, {json.dumps([begin, end])}, 0]",
                                                  f"[[{json.dumps(code)}], {json.dumps(shape)}, {json.dumps([begin, end])}]",
                                                  '{"dtype": {%s: 1}, "shape": %s, "data_offsets": %s}' % (
                                                      json.dumps(code), json.dumps(shape), json.dumps([begin, end])),
                                                  self.entry(code, shape, begin, end, "array")]),
            }[kind]
            header_entries[i] = bad()
        if kind == "metadata":
            self.metadata = rng.choice([{"k": 1}, ["k", "v"], "pt", {"k": None}, {"k": ["v"]}, {"k": "v", "k2": {}}])
        if kind == "non_finite":
            i = rng.randrange(len(t))
            header_entries[i] = header_entries[i][:-1] + f', "x": {rng.choice(["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "9" * 400, "1e308", "1e-400"])}}}'
        if kind == "surrogate":
            victim = t[rng.randrange(len(t))]
            victim[0] += rng.choice(["\ud800", "\udc00", "\U0001f600", "\ud83d\x41"])
            victim[0] += "#" * sum(e[0] == victim[0] for e in t)  # still a name of its own
        if kind == "deep":
            i = rng.randrange(len(t))
            depth = rng.choice([120, 124, 125, 126, 127, 200, 2000])
            inner = rng.choice([("[" * depth, "]" * depth), ('{"y": ' * depth + "1", "}" * depth)])
            header_entries[i] = header_entries[i][:-1] + f', "x": {inner[0]}{inner[1]}}}'
        header = self.header(header_entries)
        if kind == "metadata_twice":
            header = '{"__metadata__": {}, ' + header[1:]
            if self.metadata == "absent":
                header = '{"__metadata__": {"a": "b"}, ' + header[1:]
        elif kind == "not_object":
            header = rng.choice(["[]", '"x"', "1", "null", f"[{header}]"])
        elif kind == "bad_json":
            header = rng.choice([header[:-1], header[:-1] + ",}", header + "{}", header.replace(":", "=", 1), "",
                                 header.replace('"', "'", 2), header + "\x00", "\ufeff" + header])
        elif kind == "padding":  # JSON whitespace around the object is fine, anything else not
            pad = rng.choice([" ", "\t", "\n", "\r\n", "\x00", "\x0b", "\x0c"]) * rng.randint(1, 7)
            header = pad + header if rng.random() < 0.3 else header + pad
        text = header.encode("utf-8", "surrogatepass")
        if kind == "bad_json" and rng.random() < 0.3:
            text = text[:1] + rng.choice([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80"]) + text[1:]
        length = len(text)
        if kind == "header_length":
            length = rng.choice([length + 1, length + len(data) + 1, 100_000_001, 2**64 - 1, length - 1])
        out = struct.pack("<Q", length) + text + data + self.file_suffix
        if kind == "truncated":
            out = out[: rng.randrange(len(out))]
        return out


def wrapped_strides(t: torch.Tensor) -> bool:
    """Whether `t` (read by the library) is empty with sizes whose contiguous strides exceed int64:
    torch's arithmetic wraps for some such shapes instead of refusing them; we refuse them all."""
    return t.numel() == 0 and _prod(max(d, 1) for d in t.shape[1:]) >= 2**63


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def test_crafted_headers_are_refused_exactly_where_safetensors_refuses_them(tmp_path):
    rng = random.Random(RUN_SEED)
    path = tmp_path / "update.safetensors"
    outcomes = Counter()
    for case in range(3000):
        kind = KINDS[case % len(KINDS)]
        crafted = Crafted(rng, kind)
        path.write_bytes(crafted.build())
        ours, theirs = ours_reads(path), library_reads(path)
        outcomes[kind, ours is not None, theirs is not None] += 1
        if kind == "duplicate_name":  # safetensors keeps the last entry of a name; we refuse the file
            assert ours is None, (case, path.read_bytes()[:400])
            continue
        if ours is None and theirs is not None and kind == "huge_shape" and any(map(wrapped_strides, theirs.values())):
            continue  # torch's stride arithmetic wrapped past 2**64 for this empty tensor: we refuse it
        assert (ours is None) == (theirs is None), (RUN_SEED, case, kind, ours is None, path.read_bytes()[:400])
        if ours is not None:
            assert ours.keys() == theirs.keys()
            for name in ours:
                assert ours[name].dtype == theirs[name].dtype and ours[name].shape == theirs[name].shape, name
                assert torch.equal(raw_bytes(ours[name]), raw_bytes(theirs[name])), name
    for kind in KINDS:  # every kind was drawn, valid files were read and each defect refused some file
        assert outcomes[kind, True, True] + outcomes[kind, False, False] + outcomes[kind, False, True] >= 3000 // len(KINDS) - 1
    assert outcomes["valid", False, False] == 0 and outcomes["valid", True, True] > 0
    assert all(outcomes[kind, False, False] > 0 for kind in MALFORMED), outcomes
    assert outcomes["duplicate_name", False, True] > 0  # files safetensors would read over another entry's bytes


def safetensors_file(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


F32 = {"dtype": "F32", "shape": [2]}


@pytest.mark.parametrize("case, header, data, reason", [
    ("overlap", {"a": {**F32, "data_offsets": [0, 8]}, "b": {**F32, "data_offsets": [0, 8]}}, bytes(8),
     r"places tensor '[ab]' at bytes \[0, 8\] of its data, not at 8"),
    ("partial overlap", {"a": {**F32, "data_offsets": [0, 8]}, "b": {**F32, "data_offsets": [4, 12]}}, bytes(12),
     r"places tensor 'b' at bytes \[4, 12\] of its data, not at 8"),
    ("duplicate name", None, bytes(8), r"declares tensor 'a' twice"),
    ("trailing bytes", {"a": {**F32, "data_offsets": [0, 8]}}, bytes(12), r"has 4 bytes after its last tensor's data"),
    ("unread NaN", {"a": {**F32, "data_offsets": [4, 12]}}, struct.pack("<f", float("nan")) + bytes(8),
     r"places tensor 'a' at bytes \[4, 12\] of its data, not at 0"),
])
def test_malformed_update_files_are_refused_naming_client_and_defect(tmp_path, case, header, data, reason):
    path = tmp_path / "u.safetensors"
    if header is None:  # JSON with a key twice: the last would win
        text = b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "a": {"dtype": "I32", "shape": [2], "data_offsets": [0, 8]}}'
        path.write_bytes(struct.pack("<Q", len(text)) + text + data)
        assert library_reads(path) is not None  # the library reads it, as one tensor of the two
    else:
        path.write_bytes(safetensors_file(header, data))
        assert library_reads(path) is None
    with pytest.raises(ValueError, match=r"^Update of 'c1' for round 4: u.safetensors is not a readable safetensors file: it " + reason):
        UpdateFile(path, "c1", 4)


def test_a_shared_header_is_parsed_once_but_each_file_is_checked_against_it(tmp_path):
    """The header cache keys on the header's bytes: a file whose header is cached is still refused
    when its own data does not end where that header says."""
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7)}
    paths = [tmp_path / f"u{k}.safetensors" for k in range(3)]
    for path in paths:
        save_file(tensors, str(path))
    paths[2].write_bytes(paths[2].read_bytes() + struct.pack("<f", float("nan")))
    with UpdateFile(paths[0]) as first, UpdateFile(paths[1]) as second:
        assert second.specs is first.specs
    with pytest.raises(ValueError, match="has 4 bytes after its last tensor's data"):
        UpdateFile(paths[2], "c2", 1)
    with UpdateFile(paths[1]) as again:
        assert torch.equal(again.read("a"), tensors["a"])


def test_the_aggregator_refuses_an_update_with_unread_bytes_and_keeps_the_others(tmp_path, gen):
    s = get_strategy(make_config("fedit", r=3))
    state = random_state(gen, torch.float32, round=0)
    ups = [random_update(state, gen) for _ in range(3)]
    paths = []
    for k, update in enumerate(ups):
        paths.append(tmp_path / f"c{k}.safetensors")
        save_file({key: v.contiguous() for key, v in update.items()}, str(paths[-1]))
    paths[1].write_bytes(paths[1].read_bytes() + struct.pack("<f", float("nan")) * 4)  # NaN that no tensor points at
    agg = s.aggregator(state)
    refused = agg.accept_files([(f"c{k}", p, 2 + k) for k, p in enumerate(paths)])
    assert list(refused) == ["c1"] and "16 bytes after its last tensor's data" in str(refused["c1"])
    expected = s.aggregate(state, [("c0", ups[0], 2), ("c2", ups[2], 4)])
    assert all(torch.equal(agg.result().tensors[k], expected.tensors[k]) for k in expected.tensors)
