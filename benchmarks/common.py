"""Shared by every benchmark: machine info, result JSON, memory measurement, subprocess workers, plots.

Benchmarks are run as scripts (`python benchmarks/<name>.py`); each writes `results/<name>.json`
(numbers plus the machine they were measured on) and PNG plots beside it. `report.py` turns the
JSON files into BENCHMARKS.md, so no number is ever typed by hand.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parent.parent


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU, memory, library versions, date, and how busy the machine was."""
    import psutil
    import torch

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def write_json(name: str, data: dict[str, Any]) -> Path:
    """Write `results/<name>.json` (with the machine info under "machine") and return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    data = {"benchmark": name, "script": Path(sys.argv[0]).stem, "command": command_line(), "machine": machine_info(), **data}
    path.write_text(json.dumps(data, indent=2))
    print(f"wrote {path.relative_to(REPO)}")
    return path


def command_line() -> str:
    """The command that is running, as a user would type it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(REPO)
    except ValueError:
        pass
    return " ".join([".venv/bin/python", str(script), *sys.argv[1:]])


def current_rss() -> int:
    """Resident set size of this process now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Make the peak RSS start again from the current RSS (Linux: /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss() -> int:
    """Peak resident set size of this process (since `reset_peak_rss`), in bytes.

    /proc/self/status VmHWM, not getrusage: ru_maxrss carries the parent's RSS over fork and exec.
    """
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def run_worker(script: str | Path, args: list[str]) -> dict[str, Any]:
    """Run `script --worker ARGS` in a fresh interpreter (so its peak RSS is its own) and return the JSON
    object it prints on its last line of stdout."""
    out = subprocess.run([sys.executable, str(script), "--worker", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"worker {args} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def emit(result: dict[str, Any]) -> None:
    """A worker's answer to `run_worker`: one JSON line on stdout."""
    print(json.dumps(result), flush=True)


def run_pool(ready, key, workers: int, initializer, initargs: tuple, fn, on_result) -> None:
    """Run `fn(item)` in `workers` spawned processes (each set up once by `initializer(*initargs)`) for
    every item `ready()` returns, calling `on_result(result)` here as each one finishes. `ready()` is
    asked again after each result, so items may depend on earlier results; an item whose `key(item)`
    was handed out before is not run again."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    context = multiprocessing.get_context("spawn")
    handed_out: set = set()
    with ProcessPoolExecutor(workers, mp_context=context, initializer=initializer, initargs=initargs) as pool:
        running: set = set()
        while True:
            for item in [i for i in ready() if key(i) not in handed_out][: max(0, workers - len(running))]:
                handed_out.add(key(item))
                running.add(pool.submit(fn, item))
            if not running:
                return
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                on_result(future.result())


_WORKER: dict[str, Any] = {}


def _sentiment_worker(args, run_one) -> None:
    """A worker process of `run_sentiment_pool`: one torch thread, the tokenized tweets loaded once."""
    import torch

    from peft_federated.demo import sentiment_data

    torch.set_num_threads(1)
    _WORKER.update(args=args, run_one=run_one, data=sentiment_data(args.train_examples, args.eval_examples))


def _timed_run(run: dict) -> dict:
    start = time.time()
    return {**_WORKER["run_one"](run, _WORKER["args"], _WORKER["data"]), "seconds": time.time() - start}


def run_sentiment_pool(ready, key, args, run_one, on_result) -> None:
    """`run_pool` for the sentiment benchmarks: `run_one(run, args, (train, test, tokenizer))` in
    `args.workers` processes, each result with its "seconds"."""
    run_pool(ready, key, args.workers, _sentiment_worker, (args, run_one), _timed_run, on_result)


def pyplot():
    """matplotlib's pyplot with a file-only backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, name: str) -> Path:
    path = RESULTS / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path.relative_to(REPO)}")
    return path
