"""Server-side aggregation of Llama-2-7B-shaped LoRA updates: our streaming aggregator vs Flower vs naive torch.

Every client update is a safetensors file on disk shaped like a Llama-2-7B LoRA adapter (rank 16 on
q/k/v/o_proj of 32 layers, hidden 4096, PEFT's key names), written by `LocalStore.submit_update`.
For each K every method aggregates the same first K files (FedAvg weighted by sample counts), each
in a fresh subprocess so its peak RSS is its own:

- ours:           `get_strategy(config).aggregator(state).accept_files(files)`: headers checked, then
                  4 MiB runs of back-to-back tensors, each run of every client read in turn where it
                  lies in the page cache (mapped, not copied) while that run's running means stay in
                  cache, in worker threads; values checked (no sha256 check): the library's path.
- ours_store:     the same after `fetch_update_files` verifies each file's sha256 (in threads), as
                  `aggregate_round` does.
- ours_accept:    `accept()` one update at a time, each file loaded by safetensors (memory-mapped),
                  client by client: the library's per-update path.
- flower:         `flwr.server.strategy.aggregate.aggregate` over numpy arrays (every update held in
                  memory, as a Flower server holds its results).
- flower_message: `flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords`, what Flower's
                  current (Message API) FedAvg calls, over ArrayRecords of every update.
- naive:          load every file, stack each tensor over clients, weighted mean.

The bound: every client byte read once at the slower of two bandwidths measured in the same run,
a read of the files from the page cache (they are in it: the run reads them first and never drops
caches; the fastest of pread and of summing their mapped pages) and a read (sum) of a large
in-memory tensor, each the faster of one thread and as many threads as the aggregator uses (so the
bound is the machine's, not one core's). Beside it, the fold's arithmetic alone: the same running
mean over adapters already in memory (no files), and a weighted sum in its place, so the part of the
gap that is arithmetic rather than reading is measured too.

    .venv/bin/python benchmarks/aggregation.py [--clients 10 50 200] [--dtype float32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import mmap
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import current_rss, emit, peak_rss, reset_peak_rss, pyplot, run_worker, save_figure, write_json  # noqa: E402

LAYERS, HIDDEN, RANK = 32, 4096, 16
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
METHODS = ("ours", "ours_store", "ours_accept", "flower", "flower_message", "naive")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GiB = 2**30


def module_names() -> list[str]:
    return [f"model.layers.{i}.self_attn.{p}" for i in range(LAYERS) for p in PROJECTIONS]


def adapter_numel() -> int:
    return len(module_names()) * 2 * RANK * HIDDEN


def num_samples(k: int) -> int:
    return 100 + (37 * k) % 900


def client_id(k: int) -> str:
    return f"client-{k:03d}"


def make_update(k: int, dtype: torch.dtype, pool: torch.Tensor) -> dict[str, torch.Tensor]:
    """Client k's update: a slice of a shared random pool starting at a client-specific offset
    (distinct values per client, without drawing 17M normals per client)."""
    from peft_federated.state import lora_key

    flat = pool[(k * 7919 * 64) % adapter_numel():][: adapter_numel()].to(dtype)
    out, offset = {}, 0
    for m in module_names():
        for factor, shape in (("lora_A", (RANK, HIDDEN)), ("lora_B", (HIDDEN, RANK))):
            out[lora_key(m, factor)] = flat[offset: offset + RANK * HIDDEN].view(shape)
            offset += RANK * HIDDEN
    return out


def prepare_store(workdir: Path, clients: int, dtype: str):
    """A LocalStore holding `clients` updates for round 0 (reused when a previous run made them)."""
    from peft_federated.hub_integration.store import LocalStore

    spec = {"layers": LAYERS, "hidden": HIDDEN, "rank": RANK, "dtype": dtype}
    spec_file = workdir / "spec.json"
    if spec_file.exists() and json.loads(spec_file.read_text()) != spec:
        shutil.rmtree(workdir)
    store = LocalStore(workdir / "store")
    spec_file.write_text(json.dumps(spec))
    existing = set(store.list_updates(0))
    pool = torch.randn(2 * adapter_numel(), generator=torch.Generator().manual_seed(0)) * 0.02
    for k in range(clients):
        if client_id(k) not in existing:
            print(f"\rwriting client updates {k + 1}/{clients}", end="", flush=True)
            store.submit_update(0, client_id(k), make_update(k, DTYPES[dtype], pool), {"num_samples": num_samples(k), "base_round": 0})
    print()
    return store


def update_path(store, k: int) -> Path:
    return store._update_dir(0, client_id(k)) / "update.safetensors"


# ---- bandwidths -------------------------------------------------------------------------------------
def page_cache_read_bandwidth(paths: list[Path], repeats: int = 2, threads: int = 1) -> float:
    """Bytes/s of reading `paths` (already in the page cache), the fastest of four ways: `pread` into a
    reused 1 MiB buffer or summing the file's mapped pages (mmap, as `ours` reads them), each by one
    thread reading the files in turn and by `threads` threads each reading its share of every file."""
    total = sum(p.stat().st_size for p in paths)

    def read_share(share: int, of: int, mapped: bool) -> None:
        buf = memoryview(bytearray(2**20))
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                offset, end = size * share // of // 8 * 8, size * (share + 1) // of // 8 * 8
                if mapped:
                    with mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE) as mm:
                        torch.frombuffer(mm, dtype=torch.uint8)[offset:end].view(torch.int64).sum()
                while not mapped and offset < end:
                    offset += os.preadv(fd, [buf[: min(len(buf), end - offset)]], offset)
            finally:
                os.close(fd)

    best = float("inf")
    for _ in range(repeats):
        for of in sorted({1, threads}):
            for mapped in (False, True):
                start = time.perf_counter()
                with ThreadPoolExecutor(of) as pool:
                    list(pool.map(read_share, range(of), [of] * of, [mapped] * of))
                best = min(best, time.perf_counter() - start)
    return total / best


def memory_bandwidth(nbytes: int = 1 * GiB, repeats: int = 5, threads: int = 1) -> dict[str, float]:
    """Bytes/s of reading (sum) and of copying a large float32 tensor, the fastest with torch on one
    thread and on `threads`."""
    x = torch.ones(nbytes // 4)
    y = torch.empty_like(x)
    before = torch.get_num_threads()

    def best(fn) -> float:
        times = []
        for n in sorted({1, threads}):
            torch.set_num_threads(n)
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
        torch.set_num_threads(before)
        return min(times)

    return {"sum_bytes_per_s": nbytes / best(x.sum), "memcpy_bytes_per_s": nbytes / best(lambda: y.copy_(x))}


def fold_arithmetic_bandwidth(numel: int, dtype: torch.dtype, clients: int = 16, repeats: int = 3,
                              threads: int = 1) -> dict[str, float]:
    """Bytes/s of the fold's arithmetic alone: `clients` adapters of `numel` values of `dtype`, in memory
    (no files), averaged as `ours` does (runs of `RUN_BYTES`, a float32 running mean per run updated by
    one `lerp_` per client, narrower values widened to float32 first; `threads` workers each taking a
    contiguous share of the runs), the fastest of `repeats`; and the same with a weighted sum (one
    `add_(x, alpha=w)` per client) in place of the running mean. Every client byte is read once from
    memory, as in the bound; the gap to it is the arithmetic's."""
    from peft_federated.fold import RUN_BYTES

    gen = torch.Generator().manual_seed(0)
    pool = [torch.randn(numel, generator=gen).to(dtype) for _ in range(clients)]
    run = RUN_BYTES // dtype.itemsize
    starts = range(0, numel, run)
    mean_dtype = torch.promote_types(dtype, torch.float32)

    def fold(share: int, op: str) -> None:
        torch.set_num_threads(1)
        wide = torch.empty(run, dtype=mean_dtype)
        for start in starts[len(starts) * share // threads: len(starts) * (share + 1) // threads]:
            mean = pool[0][start: start + run].to(mean_dtype, copy=True)
            for k in range(1, clients):
                x = pool[k][start: start + run]
                if op == "weighted_sum":
                    mean.add_(x, alpha=1 / (k + 1))
                else:
                    mean.lerp_(x if x.dtype == mean_dtype else wide[: len(x)].copy_(x), 1 / (k + 1))

    before, best = torch.get_num_threads(), {"lerp": float("inf"), "weighted_sum": float("inf")}
    with ThreadPoolExecutor(threads) as workers:
        for _ in range(repeats):
            for op in best:
                begin = time.perf_counter()
                list(workers.map(fold, range(threads), [op] * threads))
                best[op] = min(best[op], time.perf_counter() - begin)
    torch.set_num_threads(before)
    return {op: clients * numel * dtype.itemsize / seconds for op, seconds in best.items()}


# ---- the methods (run inside a worker) --------------------------------------------------------------
def global_state(dtype: torch.dtype):
    """Round 0 of a FedIT federation over these modules: lora_A random, lora_B zero."""
    from peft_federated import FederatedLoraConfig
    from peft_federated.state import GlobalState, lora_key

    config = FederatedLoraConfig(strategy="fedit", r=RANK, lora_alpha=2 * RANK, target_modules=list(PROJECTIONS))
    gen = torch.Generator().manual_seed(12345)
    tensors = {}
    for m in module_names():
        tensors[lora_key(m, "lora_A")] = torch.randn(RANK, HIDDEN, generator=gen).to(dtype)
        tensors[lora_key(m, "lora_B")] = torch.zeros(HIDDEN, RANK, dtype=dtype)
    return config, GlobalState(round=0, tensors=tensors)


def aggregator_threads() -> int:
    """The worker threads of `accept_files` on this machine (the library's default)."""
    from peft_federated.strategies import get_strategy

    config, state = global_state(torch.float32)
    return get_strategy(config).aggregator(state).threads


def run_ours(store, k_clients: int, dtype: torch.dtype, through_store: bool):
    from peft_federated.strategies import get_strategy

    config, state = global_state(dtype)
    gc.collect()
    baseline = current_rss()
    reset_peak_rss()
    start = time.perf_counter()
    if through_store:  # what aggregate_round does: each file checked against its sha256 first, in threads
        from peft_federated.aggregator import fetch_update_files

        fetched = fetch_update_files(store, 0, [client_id(k) for k in range(k_clients)])
        files = [(c, path, meta["num_samples"]) for c, (path, meta) in fetched]
    else:
        files = [(client_id(k), update_path(store, k), num_samples(k)) for k in range(k_clients)]
    aggregator = get_strategy(config).aggregator(state)
    refused = aggregator.accept_files(files)
    assert not refused, refused
    out = aggregator.result().tensors
    return baseline, time.perf_counter() - start, {}, out


def run_ours_accept(store, k_clients: int, dtype: torch.dtype):
    """`accept()` one loaded update at a time (client by client, each file memory-mapped by safetensors)."""
    from peft_federated.hub_integration.layout import load_safetensors
    from peft_federated.strategies import get_strategy

    config, state = global_state(dtype)
    gc.collect()
    baseline = current_rss()
    reset_peak_rss()
    start = time.perf_counter()
    aggregator = get_strategy(config).aggregator(state)
    for k in range(k_clients):
        aggregator.accept(load_safetensors(update_path(store, k)), num_samples(k), client_id(k))
    out = aggregator.result().tensors
    return baseline, time.perf_counter() - start, {}, out


def run_ours_breakdown(store, k_clients: int, dtype: torch.dtype):
    """Where `ours` spends its time, per client (diagnostic): opening the files and checking their headers,
    reading the fold's runs in its order (one thread) without aggregating, and the whole `accept_files`."""
    from peft_federated.strategies import get_strategy

    config, state = global_state(dtype)
    files = [(client_id(k), update_path(store, k), num_samples(k)) for k in range(k_clients)]
    aggregator = get_strategy(config).aggregator(state)
    t0 = time.perf_counter()
    opened, _ = aggregator.open_files(files)
    t1 = time.perf_counter()
    runs = aggregator._mean_runs(opened)
    buffer = torch.empty(max(run.nbytes for run in runs), dtype=torch.uint8)
    for run in runs:
        for u in opened:
            u.file.read_range(u.file.data_start + run.offset, buffer[: run.nbytes])
    t2 = time.perf_counter()
    for u in opened:
        u.file.close()
    aggregator = get_strategy(config).aggregator(state)
    t3 = time.perf_counter()
    aggregator.accept_files(files)
    t4 = time.perf_counter()
    out = aggregator.result().tensors
    phases = {"open_and_check_headers": t1 - t0, "read_only": t2 - t1, "accept_files": t4 - t3, "result": time.perf_counter() - t4}
    return 0, t4 - t3, {k: v / k_clients if k != "result" else v for k, v in phases.items()}, out


def run_naive(store, k_clients: int, dtype: torch.dtype):
    from safetensors.torch import load_file

    gc.collect()
    baseline = current_rss()
    reset_peak_rss()
    start = time.perf_counter()
    updates = [load_file(update_path(store, k)) for k in range(k_clients)]
    w = torch.tensor([num_samples(k) for k in range(k_clients)], dtype=torch.float32)
    w = w / w.sum()
    out = {}
    for key in updates[0]:
        stacked = torch.stack([u[key] for u in updates]).float()
        out[key] = (stacked * w.view(-1, 1, 1)).sum(0).to(dtype)
    return baseline, time.perf_counter() - start, {}, out


def load_numpy(store, k: int) -> dict:
    """A client's update as float32 numpy arrays of its own (numpy has no bfloat16)."""
    from safetensors.torch import load_file

    return {key: t.float().numpy().copy() for key, t in load_file(update_path(store, k)).items()}


def run_flower(store, k_clients: int, dtype: torch.dtype):
    from flwr.server.strategy.aggregate import aggregate

    gc.collect()
    baseline = current_rss()
    reset_peak_rss()
    start = time.perf_counter()
    keys = None
    results = []
    for k in range(k_clients):
        arrays = load_numpy(store, k)
        keys = keys or list(arrays)
        results.append(([arrays[key] for key in keys], num_samples(k)))
    loaded = time.perf_counter()
    out = dict(zip(keys, aggregate(results)))
    end = time.perf_counter()
    return baseline, end - start, {"load_s": loaded - start, "aggregate_s": end - loaded}, out


def run_flower_message(store, k_clients: int, dtype: torch.dtype):
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    gc.collect()
    baseline = current_rss()
    reset_peak_rss()
    start = time.perf_counter()
    records = []
    for k in range(k_clients):
        arrays = ArrayRecord(array_dict={key: Array(a) for key, a in load_numpy(store, k).items()})
        records.append(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": num_samples(k)})}))
    loaded = time.perf_counter()
    result = aggregate_arrayrecords(records, "num-examples")
    end = time.perf_counter()
    out = {key: result[key].numpy() for key in result}
    return baseline, end - start, {"load_s": loaded - start, "aggregate_s": end - loaded}, out


def checksum(out: dict) -> list[float]:
    """Sum and sum of squares of every output value, in float64: methods must agree on both."""
    tensors = [torch.as_tensor(v).double() for v in out.values()]
    return [float(sum(t.sum() for t in tensors)), float(sum((t * t).sum() for t in tensors))]


def worker(method: str, k_clients: int, workdir: Path, dtype_name: str, threads: int) -> None:
    from peft_federated.hub_integration.store import LocalStore

    torch.set_num_threads(threads)
    runners = {
        "ours": partial(run_ours, through_store=False),
        "ours_store": partial(run_ours, through_store=True),
        "ours_accept": run_ours_accept,
        "flower": run_flower,
        "flower_message": run_flower_message,
        "naive": run_naive,
        "ours_breakdown": run_ours_breakdown,
    }
    baseline, seconds, phases, out = runners[method](LocalStore(workdir / "store"), k_clients, DTYPES[dtype_name])
    peak = peak_rss()
    emit({"seconds": seconds, "baseline_rss": baseline, "peak_rss": peak, "phases": phases, "checksum": checksum(out)})


# ---- the driver -------------------------------------------------------------------------------------
def predicted_extra_memory(method: str, k: int, adapter_bytes: int) -> int:
    """A method's memory need above its baseline, to skip runs that would not fit (pages of mapped files excluded)."""
    fp32 = adapter_numel() * 4
    return {
        "ours": 3 * adapter_bytes,
        "ours_store": 4 * adapter_bytes,
        "ours_accept": 3 * adapter_bytes,
        "flower": 2 * k * fp32 + fp32,
        "flower_message": k * fp32 + 2 * fp32,
        "naive": 2 * fp32,
    }[method]


def worker_run(args, method: str, k: int) -> dict:
    """One run of `method` over the first k files, in a fresh process."""
    return run_worker(__file__, [method, str(k), "--workdir", str(args.workdir), "--dtype", args.dtype, "--threads", str(args.threads)])


def measure(args, method: str, k: int, paths: list[Path], read_bw: dict[int, float]) -> dict:
    """`args.repeats` runs, each right after a read of the K files (the VM pages out files idle for about
    a minute; the read keeps them cached and measures the page-cache bandwidth): the fastest run."""
    reps = []
    for _ in range(args.repeats):
        read_bw[k] = max(read_bw.get(k, 0.0), page_cache_read_bandwidth(paths[:k], repeats=1, threads=args.bound_threads))
        reps.append(worker_run(args, method, k))
    best = min(reps, key=lambda r: r["seconds"])
    return {
        "seconds": best["seconds"],
        "seconds_median": statistics.median(r["seconds"] for r in reps),
        "phases": best["phases"],
        "peak_above_baseline_bytes": max(r["peak_rss"] - r["baseline_rss"] for r in reps),
        "baseline_rss_bytes": best["baseline_rss"],
        "checksum": best["checksum"],
    }


def compare(runs: list[dict], bound: dict[int, float], adapter_bytes: int) -> None:
    """Add throughput, fraction of the bound, agreement with ours and our speedups to the runs."""
    for row in runs:
        if "seconds" not in row:
            continue
        row["throughput_bytes_per_s"] = row["client_bytes"] / row["seconds"]
        row["fraction_of_bound"] = row["throughput_bytes_per_s"] / bound[row["clients"]]
        row["peak_above_baseline_adapters"] = row["peak_above_baseline_bytes"] / adapter_bytes
    for k in {r["clients"] for r in runs}:
        by = {r["method"]: r for r in runs if r["clients"] == k and "seconds" in r}
        if "ours" not in by:
            continue
        for method, row in by.items():  # every method must compute the same average as ours
            row["relative_difference_to_ours"] = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(row["checksum"], by["ours"]["checksum"]))
            if method in ("naive", "flower", "flower_message"):
                by["ours"][f"speedup_vs_{method}"] = row["seconds"] / by["ours"]["seconds"]


def main() -> None:
    import flwr
    import psutil

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50, 200])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--repeats", type=int, default=3, help="runs of each (method, K); the fastest is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads in every method")
    parser.add_argument("--workdir", type=Path, help="where the client files are (default /tmp/peft-federated-bench/aggregation-DTYPE)")
    parser.add_argument("--name", default="aggregation")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.workdir = args.workdir or Path(f"/tmp/peft-federated-bench/aggregation-{args.dtype}")
    if args.worker:
        return worker(args.worker[0], int(args.worker[1]), args.workdir, args.dtype, args.threads)

    store = prepare_store(args.workdir, max(args.clients), args.dtype)
    paths = [update_path(store, k) for k in range(max(args.clients))]
    adapter_bytes = paths[0].stat().st_size
    torch.set_num_threads(args.threads)
    args.bound_threads = aggregator_threads()
    mem = memory_bandwidth(threads=args.bound_threads)
    fold_bw = fold_arithmetic_bandwidth(adapter_numel(), DTYPES[args.dtype], threads=args.bound_threads)
    print(f"memory read {mem['sum_bytes_per_s'] / 1e9:.1f} GB/s, in-memory fold {fold_bw['lerp'] / 1e9:.1f} GB/s, "
          f"adapter {adapter_bytes / 2**20:.1f} MiB")

    runs, read_bw = [], {}
    for k in sorted(args.clients):
        client_bytes = sum(p.stat().st_size for p in paths[:k])
        read_bw[k] = page_cache_read_bandwidth(paths[:k], threads=args.bound_threads)
        # Memory a method may use: what is available (page cache counts as available) but the K files' cache.
        spare = psutil.virtual_memory().available - client_bytes - 2 * GiB
        print(f"K={k}: page-cache read {read_bw[k] / 1e9:.1f} GB/s, {spare / GiB:.1f} GiB spare besides the K files")
        for method in args.methods:
            row = {"method": method, "clients": k, "client_bytes": client_bytes}
            need = predicted_extra_memory(method, k, adapter_bytes)
            if need > spare:
                row["skipped"] = f"needs about {need / GiB:.1f} GiB above its baseline; {spare / GiB:.1f} GiB spare"
            else:
                row.update(measure(args, method, k, paths, read_bw))
            runs.append(row)
            print(f"K={k:4d} {method:15s}", row.get("skipped") or f"{row['seconds']:7.2f} s, "
                  f"peak +{row['peak_above_baseline_bytes'] / 2**20:.0f} MiB")
    k_diag = max(c for c in args.clients if c <= 50) if min(args.clients) <= 50 else min(args.clients)
    page_cache_read_bandwidth(paths[:k_diag], repeats=1, threads=args.bound_threads)
    breakdown = worker_run(args, "ours_breakdown", k_diag)
    print(f"ours, seconds per client at K={k_diag}: {breakdown['phases']}")
    bound = {k: min(bw, mem["sum_bytes_per_s"]) for k, bw in read_bw.items()}
    compare(runs, bound, adapter_bytes)

    write_json(args.name, {
        "description": "FedAvg of K Llama-2-7B-shaped LoRA updates (rank 16, q/k/v/o of 32 layers, hidden 4096) "
                       "stored as safetensors files in the page cache; wall time, peak RSS above the process "
                       "baseline, and throughput against reading every client byte once.",
        "dtype": args.dtype,
        "adapter_bytes": adapter_bytes,
        "adapter_parameters": adapter_numel(),
        "threads": args.threads,
        "aggregator_threads": args.bound_threads,
        "repeats": args.repeats,
        "flwr_version": flwr.__version__,
        "bandwidth": {"page_cache_read_bytes_per_s": {str(k): v for k, v in read_bw.items()}, **mem,
                      "bound_bytes_per_s": {str(k): v for k, v in bound.items()},
                      "bound": f"min(page-cache read of the K files (pread or mmap + sum), in-memory read (sum)), each the fastest with 1 and "
                               f"{args.bound_threads} threads (the aggregator's) and of every pass (one right before "
                               "every run); files in page cache, caches never dropped"},
        "fold_arithmetic": {"bytes_per_s": fold_bw,
                            "fraction_of_bound": {op: {str(k): bw / v for k, v in bound.items()} for op, bw in fold_bw.items()},
                            "note": f"the fold's arithmetic alone: 16 {args.dtype} adapters in memory (no files) averaged "
                                    "by runs in the aggregator's threads into float32 or wider, one lerp_ per client and run "
                                    "(the running mean ours keeps, narrower values widened first) or one add_ with a weight "
                                    "(a weighted sum); fastest of 3"},
        "ours_breakdown": {"clients": k_diag, "seconds_per_client": breakdown["phases"],
                           "note": "per client: open_and_check_headers (open_files), read_only (the fold's runs read in "
                                   "its order by one thread, nothing aggregated), accept_files (the whole fold: read, check, "
                                   "aggregate); result: once per round, in seconds"},
        "targets": {"fraction_of_bound": 0.6, "peak_above_baseline_adapters": 3.0, "speedup_vs_naive": 2.0},
        "runs": runs,
    })
    plot(runs, args.name)


def plot(runs: list[dict], name: str) -> None:
    plt = pyplot()
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for method in METHODS:
        rows = [r for r in runs if r["method"] == method and "seconds" in r]
        if rows:
            ks = [r["clients"] for r in rows]
            ax_t.plot(ks, [r["seconds"] for r in rows], marker="o", label=method)
            ax_m.plot(ks, [r["peak_above_baseline_bytes"] / 2**20 for r in rows], marker="o", label=method)
    for ax, label in ((ax_t, "wall time (s)"), (ax_m, "peak RSS above baseline (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("clients K")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle("FedAvg of Llama-2-7B-shaped LoRA updates (rank 16)")
    save_figure(fig, name)


if __name__ == "__main__":
    main()
