"""Aggregating update files module by module (`Aggregator.accept_files`): the same result as `accept`
on each update in turn, bit for bit, for every strategy; bad files are refused and leave no trace."""

from __future__ import annotations

import gc
import json
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers import make_config
from safetensors.torch import save_file
from test_invariants import random_state, random_update, random_upload

from peft_federated import get_strategy
from peft_federated import fold
from peft_federated.update_file import UpdateFile

STRATEGIES = ["fedit", "ffa", "rolora", "hetlora", "lora_fair", "flora", "fedex", "fedsa"]
SAMPLES = [4, 1, 9, 2, 7]


def write_updates(tmp_path, updates):
    paths = []
    for k, update in enumerate(updates):
        path = tmp_path / f"c{k}.safetensors"
        save_file({key: v.contiguous() for key, v in update.items()}, str(path))
        paths.append(path)
    return paths


def assert_same_state(a, b):
    assert a.round == b.round and a.strategy_state == b.strategy_state
    assert a.tensors.keys() == b.tensors.keys() and a.base_delta.keys() == b.base_delta.keys()
    for key in a.tensors:
        assert torch.equal(a.tensors[key], b.tensors[key]), key
    for m in a.base_delta:
        assert torch.equal(a.base_delta[m].U, b.base_delta[m].U) and torch.equal(a.base_delta[m].V, b.base_delta[m].V)


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("round", [0, 1])
def test_files_module_by_module_equal_accept_one_by_one(tmp_path, gen, dtype, name, round):
    kw = {"client_ranks": {"c0": 1, "c1": 2, "c3": 1}} if name in ("hetlora", "flora") else {}
    s = get_strategy(make_config(name, r=3, **kw))
    state = random_state(gen, dtype, round=round)
    ranks = [s.client_rank(state, f"c{k}") for k in range(len(SAMPLES))]
    ups = [random_upload(s, state, gen, rank=r) for r in ranks]
    one_by_one = s.aggregate(state, [(f"c{k}", u, n) for k, (u, n) in enumerate(zip(ups, SAMPLES))])
    agg = s.aggregator(state)
    paths = write_updates(tmp_path, ups)
    assert agg.accept_files([(f"c{k}", p, n) for k, (p, n) in enumerate(zip(paths, SAMPLES))]) == {}
    assert_same_state(agg.result(), one_by_one)
    assert sorted(agg.clients) == [f"c{k}" for k in range(len(SAMPLES))]


def only_runs(monkeypatch, run_bytes):
    """Fold plain means by runs of `run_bytes` at most, and fail if the module-by-module fold is used."""
    def fail(*args):
        raise AssertionError("folded module by module, not by runs")

    monkeypatch.setattr(fold, "RUN_BYTES", run_bytes)
    monkeypatch.setattr(fold, "fold_modules", fail)


@pytest.mark.parametrize("name", ["fedit", "ffa", "rolora", "fedsa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("run_bytes", [1, 100, 2**20])
@pytest.mark.parametrize("threads", [1, 3])
def test_plain_means_fold_by_runs_equal_accept_one_by_one(tmp_path, monkeypatch, gen, name, dtype, run_bytes, threads):
    s = get_strategy(make_config(name, r=3))
    state = random_state(gen, dtype, round=1)
    ups = [random_upload(s, state, gen) for _ in SAMPLES]
    one_by_one = s.aggregate(state, [(f"c{k}", u, n) for k, (u, n) in enumerate(zip(ups, SAMPLES))])
    only_runs(monkeypatch, run_bytes)  # 1 byte: one tensor a run; 100: a few; 1 MiB: the whole file
    agg = s.aggregator(state, threads=threads)
    paths = write_updates(tmp_path, ups)
    assert agg.accept_files([(f"c{k}", p, n) for k, (p, n) in enumerate(zip(paths, SAMPLES))]) == {}
    assert_same_state(agg.result(), one_by_one)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_means_on_their_own_mapping_equal_accept_and_outlive_the_aggregator(tmp_path, monkeypatch, gen, dtype):
    """Means of 2 MiB and more go on an anonymous mapping of their own (huge pages); here every
    size does. The published tensors are views of it: they must stay valid once the aggregator is gone."""
    monkeypatch.setattr(fold, "HUGE_PAGE_BYTES", 1)
    mapped, empty_huge = [], fold.empty_huge

    def counted(numel, dtype):
        mapped.append(empty_huge(numel, dtype))
        return mapped[-1]

    monkeypatch.setattr(fold, "empty_huge", counted)
    only_runs(monkeypatch, 100)  # a few tensors a run: several runs, shared by both workers
    s = get_strategy(make_config("fedit", r=3))
    state = random_state(gen, dtype, round=1)
    ups = [random_update(state, gen) for _ in SAMPLES]
    one_by_one = s.aggregate(state, [(f"c{k}", u, n) for k, (u, n) in enumerate(zip(ups, SAMPLES))])
    paths = write_updates(tmp_path, ups)
    agg = s.aggregator(state, threads=2)
    assert agg.accept_files([(f"c{k}", p, n) for k, (p, n) in enumerate(zip(paths, SAMPLES))]) == {}
    assert len(mapped) == 2  # one per worker
    result = agg.result()
    del agg, mapped[:]
    gc.collect()
    assert_same_state(result, one_by_one)


def save_reversed(tensors: dict, path) -> None:
    """A valid safetensors file with its tensors in the reverse of the order `save_file` gives."""
    header, offset, blobs = {}, 0, []
    for key in sorted(tensors, reverse=True):
        data = tensors[key].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        header[key] = {"dtype": "F32", "shape": list(tensors[key].shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def test_files_laid_out_differently_fold_module_by_module(tmp_path, monkeypatch, gen):
    s = get_strategy(make_config("fedit", r=3))
    state = random_state(gen, torch.float32, round=0)
    ups = [random_update(state, gen) for _ in range(3)]
    paths = write_updates(tmp_path, ups)
    save_file({k: v.contiguous() for k, v in ups[1].items()}, str(paths[1]), metadata={"note": "x" * 100})
    assert UpdateFile(paths[1]).layout() == UpdateFile(paths[0]).layout()  # metadata moves the data, not the layout
    save_reversed(ups[2], paths[2])
    assert UpdateFile(paths[2]).layout() != UpdateFile(paths[0]).layout()
    calls = []
    monkeypatch.setattr(fold, "fold_runs", lambda *a: calls.append("runs"))
    agg = s.aggregator(state)
    assert agg.accept_files([(f"c{k}", p, n) for k, (p, n) in enumerate(zip(paths, SAMPLES))]) == {}
    assert calls == []
    assert_same_state(agg.result(), s.aggregate(state, [(f"c{k}", u, n) for k, (u, n) in enumerate(zip(ups, SAMPLES))]))


@pytest.mark.parametrize("name", ["fedex", "fedit"])  # module by module, and by runs (its check is deferred)
@pytest.mark.parametrize("where", ["first", "last"])
def test_non_finite_values_found_mid_fold_leave_no_trace(tmp_path, monkeypatch, gen, name, where):
    if name == "fedit":
        only_runs(monkeypatch, 100)
    s = get_strategy(make_config(name, r=3))
    state = random_state(gen, torch.float32, round=1)
    ups = [random_update(state, gen) for _ in range(4)]
    bad = dict(ups[2])
    key = sorted(k for k in bad if "lora_B" in k)[0 if where == "first" else -1]  # the first or last module read
    bad[key] = bad[key].clone()
    bad[key][1, 0] = float("nan")
    paths = write_updates(tmp_path, [ups[0], ups[1], bad, ups[3]])
    agg = s.aggregator(state)
    refused = agg.accept_files([(f"c{k}", p, n) for k, (p, n) in enumerate(zip(paths, SAMPLES))])
    assert list(refused) == ["c2"] and f"{key} holds NaN or Inf" in str(refused["c2"])
    expected = s.aggregate(state, [(f"c{k}", ups[k], SAMPLES[k]) for k in (0, 1, 3)])
    assert_same_state(agg.result(), expected)
    assert sorted(agg.clients) == ["c0", "c1", "c3"]


def test_bad_files_are_refused_with_reasons_others_kept(tmp_path, gen):
    s = get_strategy(make_config("fedit", r=3))
    state = random_state(gen, torch.float64, round=0)
    ups = [random_update(state, gen) for _ in range(3)]
    paths = write_updates(tmp_path, ups)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(paths[1].read_bytes()[:-100])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    wrong_dtype = write_updates(tmp_path / "..", [{k: v.float() for k, v in ups[2].items()}])[0]
    agg = s.aggregator(state)
    refused = agg.accept_files([
        ("c0", paths[0], 5), ("cut", truncated, 5), ("junk", garbage, 5), ("f32", wrong_dtype, 5),
        ("gone", tmp_path / "missing.safetensors", 5), ("c0", paths[2], 5), ("zero", paths[2], 0),
    ])
    assert "truncated" in str(refused["cut"]) and "resubmit" in str(refused["cut"])
    assert "not valid JSON" in str(refused["junk"])
    assert "dtype torch.float32" in str(refused["f32"])
    assert isinstance(refused["gone"], FileNotFoundError)
    assert "num_samples must be a positive integer" in str(refused["zero"])
    assert list(agg.clients) == ["c0"]
    assert_same_state(agg.result(), s.aggregate(state, [("c0", ups[0], 5)]))


@pytest.mark.parametrize("clip", [False, True])
def test_norm_bound_applies_to_files_as_to_accept(tmp_path, gen, clip):
    s = get_strategy(make_config("fedit", r=3, max_update_norm=3.0, clip_updates=clip))
    state = random_state(gen, torch.float64, round=0)
    small = {k: v + 1e-3 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in state.tensors.items()}
    big = {k: v + torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in state.tensors.items()}
    paths = write_updates(tmp_path, [small, big])
    agg = s.aggregator(state)
    refused = agg.accept_files([("c0", paths[0], 3), ("c1", paths[1], 5)])
    reference = s.aggregator(state)
    reference.accept(small, 3, "c0")
    if clip:
        reference.accept(big, 5, "c1")
        assert refused == {} and agg.clients["c1"]["clipped"]
    else:
        assert "above max_update_norm=3" in str(refused["c1"]) and list(agg.clients) == ["c0"]
    result, expected = agg.result(), reference.result()
    for key in state.tensors:
        torch.testing.assert_close(result.tensors[key], expected.tensors[key], rtol=1e-12, atol=1e-12)
    assert agg.clients["c0"]["norm"] == pytest.approx(reference.clients["c0"]["norm"], rel=1e-12)


def test_files_after_accept_are_checked_before_folding(tmp_path, gen):
    s = get_strategy(make_config("fedit", r=3))
    state = random_state(gen, torch.float32, round=0)
    ups = [random_update(state, gen) for _ in range(3)]
    bad = {k: torch.full_like(v, float("inf")) if "lora_A" in k else v for k, v in ups[2].items()}
    paths = write_updates(tmp_path, [ups[1], bad])
    agg = s.aggregator(state)
    agg.accept(ups[0], 2, "c0")
    refused = agg.accept_files([("c1", paths[0], 3), ("c2", paths[1], 4)])
    assert list(refused) == ["c2"]
    assert_same_state(agg.result(), s.aggregate(state, [("c0", ups[0], 2), ("c1", ups[1], 3)]))


def test_update_file_reads_what_safetensors_wrote(tmp_path, gen):
    tensors = {"a": torch.randn(3, 5, generator=gen).to(torch.bfloat16), "b": torch.randn(7, generator=gen, dtype=torch.float64),
               "c": torch.zeros(0, 4), "d": torch.arange(6, dtype=torch.int64).view(2, 3)}
    path = tmp_path / "u.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    with UpdateFile(path, "c0", 3) as f:
        assert set(f.specs) == set(tensors)
        for key, value in tensors.items():
            assert f.specs[key].dtype == value.dtype and f.specs[key].shape == tuple(value.shape)
            assert torch.equal(f.read(key), value)


def test_files_sharing_a_header_parse_it_once_and_are_each_checked(tmp_path, gen):
    """A round's files mostly share one header: it is parsed once, but every file's own length is
    still checked against it, and a header differing only in its metadata is parsed on its own."""
    tensors = {"a": torch.randn(3, 5, generator=gen), "b": torch.randn(7, generator=gen)}
    paths = [tmp_path / f"u{k}.safetensors" for k in range(3)]
    for k, path in enumerate(paths):
        save_file(tensors, str(path), metadata={"client": "same" if k < 2 else "a longer, other value"})
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(paths[0].read_bytes()[:-4])
    with UpdateFile(paths[0]) as first, UpdateFile(paths[1]) as second, UpdateFile(paths[2]) as other:
        assert second.specs is first.specs
        assert other.specs is not first.specs and other.layout() == first.layout()
        assert torch.equal(second.read("a"), tensors["a"]) and torch.equal(other.read("b"), tensors["b"])
    with pytest.raises(ValueError, match=r"header places tensor data up to byte \d+ \(truncated\)"):
        UpdateFile(cut, "c9", 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_result_is_not_changed_by_later_updates(gen, dtype):
    """`result()` hands out the running means themselves (no copy of the adapter); a later update
    must not change a result already given."""
    s = get_strategy(make_config("fedit", r=3))
    state = random_state(gen, dtype, round=0)
    ups = [random_update(state, gen) for _ in range(2)]
    agg = s.aggregator(state)
    agg.accept(ups[0], 4, "c0")
    first = agg.result()
    kept = {k: v.clone() for k, v in first.tensors.items()}
    agg.accept(ups[1], 1, "c1")
    assert all(torch.equal(first.tensors[k], kept[k]) for k in kept)
    assert_same_state(agg.result(), s.aggregate(state, [("c0", ups[0], 4), ("c1", ups[1], 1)]))


@pytest.mark.parametrize("name", ["fedit", "fedex"])  # read by runs (mapped), and module by module (pread)
def test_a_file_cut_short_after_opening_is_refused_not_a_crash(tmp_path, gen, name):
    s = get_strategy(make_config(name, r=3))
    state = random_state(gen, torch.float32, round=1)
    ups = [random_update(state, gen, s.trainable_factors(1)) for _ in range(3)]
    paths = write_updates(tmp_path, ups)
    agg = s.aggregator(state)
    opened, refused = agg.open_files([(f"c{k}", p, n) for k, (p, n) in enumerate(zip(paths, SAMPLES))])
    assert refused == {}
    os.truncate(paths[1], paths[1].stat().st_size - 100)  # changed in place after its header was checked
    try:
        refused = agg.accept_opened(opened)
    finally:
        for u in opened:
            u.file.close()
    assert list(refused) == ["c1"] and "truncated" in str(refused["c1"]) and "resubmit" in str(refused["c1"])
    assert_same_state(agg.result(), s.aggregate(state, [("c0", ups[0], SAMPLES[0]), ("c2", ups[2], SAMPLES[2])]))


def test_workers_viewing_one_file_at_once_share_one_mapping(tmp_path):
    """The aggregator's workers view different runs of the same file at the same time: the file is
    mapped once (a second mapping would stay resident, unreleased, until collected)."""
    path = tmp_path / "u.safetensors"
    save_file({"a": torch.arange(2**16, dtype=torch.float32)}, str(path))
    for _ in range(20):
        with UpdateFile(path, "c0", 1) as f:
            start = threading.Barrier(4)

            def view(offset: int) -> int:
                start.wait()
                return f.view_range(f.data_start + offset, 4).data_ptr() - offset

            with ThreadPoolExecutor(4) as pool:
                bases = set(pool.map(view, [0, 4096, 8192, 12288]))
            assert len(bases) == 1
