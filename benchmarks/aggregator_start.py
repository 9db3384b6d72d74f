"""How fast the aggregator starts, and how much memory it takes: round 0 published in a LocalStore.

Two ways to build round 0 of a SEQ_CLS federation (LoRA r=8 on q_proj, v_proj; the score head trained
with the adapter), each in a fresh process (so its peak RSS is its own):
- `skeleton`: what `peft-federated aggregate` does (`roles.start_aggregator`): the model built from its
  config.json on the meta device, the head read alone from the checkpoint (or drawn from the seed);
- `full_model`: what it did before: the whole base model loaded (`from_pretrained`), then round 0.
Models shaped like Llama at ~125M, ~500M, ~1.3B and 7B parameters. The full-model path needs the
model's float32 size in memory (~27 GB at 7B: more than this machine has), so it runs on the three
smaller ones, beside the skeleton on all four; the two round 0s are compared file for file.
The checkpoints are written once under /tmp (zero-filled: values do not change loading cost).

    .venv/bin/python benchmarks/aggregator_start.py          # about 4 minutes; 7 GiB of checkpoints under /tmp
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, current_rss, emit, peak_rss, pyplot, reset_peak_rss, run_worker, save_figure, write_json  # noqa: E402

ROOT = Path("/tmp/peft-federated-bench/aggregator-start")
SHAPES = {  # name: (hidden, intermediate, layers, heads), vocabulary 32000 (Llama-2's)
    "llama-125m": (768, 2560, 12, 12),
    "llama-500m": (1536, 4096, 16, 16),
    "llama-1.3b": (2048, 5504, 24, 16),
    "llama-2-7b": (4096, 11008, 32, 32),
}
FULL_MODEL = ["llama-125m", "llama-500m", "llama-1.3b"]  # the 7B does not fit in memory loaded whole
LABELS = 2


def llama_config(name: str):
    from transformers import LlamaConfig

    hidden, inter, layers, heads = SHAPES[name]
    return LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                       num_labels=LABELS, pad_token_id=0)


def parameters(name: str) -> int:
    hidden, inter, layers, _ = SHAPES[name]
    return 32000 * hidden + layers * (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden) + hidden + LABELS * hidden


def prepare(name: str) -> Path:
    """The model's folder: config.json, plus float32 weights where the full-model path runs on it."""
    import torch
    from accelerate import init_empty_weights
    from transformers import LlamaForSequenceClassification

    folder = ROOT / name
    weights = name in FULL_MODEL
    if (folder / "config.json").is_file() and (not weights or (folder / "model.safetensors.index.json").is_file()
                                              or (folder / "model.safetensors").is_file()):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    config = llama_config(name)
    if not weights:
        config.save_pretrained(folder)
        return folder
    with init_empty_weights():
        model = LlamaForSequenceClassification(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    model.save_pretrained(folder, max_shard_size="2GB")
    return folder


def federation_config(path: Path):
    from peft_federated import FederatedLoraConfig

    return FederatedLoraConfig(strategy="fedex", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS",
                               num_rounds=10, base_model_name_or_path=str(path))


def worker(method: str, path: Path, store_dir: Path) -> None:
    """One start: the imports, then round 0 published; times and peak RSS of this process."""
    started = time.perf_counter()
    from peft import get_peft_model

    from peft_federated.aggregator import initialize
    from peft_federated.hub_integration.store import LocalStore
    from peft_federated.roles import load_base_model, start_aggregator

    imported = time.perf_counter()
    shutil.rmtree(store_dir, ignore_errors=True)
    store, config = LocalStore(store_dir), federation_config(path)
    rss_before = current_rss()
    reset_peak_rss()
    t0 = time.perf_counter()
    if method == "skeleton":
        start_aggregator(store, config, str(path), LABELS)
    else:
        initialize(store, config, get_peft_model(load_base_model(str(path), "SEQ_CLS", LABELS), config.to_lora_config()))
    seconds = time.perf_counter() - t0
    adapter = store.round_folder(0) / "adapter_model.safetensors"
    emit({"method": method, "seconds": seconds, "import_seconds": imported - started, "rss_before_bytes": rss_before,
          "peak_rss_bytes": peak_rss(), "adapter_sha256": hashlib.sha256(adapter.read_bytes()).hexdigest(),
          "adapter_bytes": adapter.stat().st_size})


def needed_bytes(folder: Path, method: str) -> int:
    """Bytes of the model folder the method reads or needs present (what a Hub download would fetch): every
    file for the full model; for the skeleton config.json, and where the checkpoint holds the head, the
    weight index, the header of the head's safetensors file and the head's tensor."""
    files = {p.name: p for p in folder.iterdir() if p.is_file()}
    if method == "full_model":
        return sum(p.stat().st_size for p in files.values())
    total = files["config.json"].stat().st_size
    index = files.get("model.safetensors.index.json")
    if index is None and "model.safetensors" not in files:
        return total
    from safetensors import safe_open

    if index is not None:
        total += index.stat().st_size
        head_file = folder / json.loads(index.read_text())["weight_map"]["score.weight"]
    else:
        head_file = files["model.safetensors"]
    with open(head_file, "rb") as f:
        total += 8 + int.from_bytes(f.read(8), "little")
    with safe_open(str(head_file), "pt") as f:
        head = f.get_tensor("score.weight")
    return total + head.numel() * head.element_size()


def plot(runs: list[dict]) -> None:
    plt = pyplot()
    fig, (ax_t, ax_m, ax_f) = plt.subplots(1, 3, figsize=(14, 4))
    for method, style in (("full_model", "o-"), ("skeleton", "s-")):
        mine = sorted((r for r in runs if r["method"] == method), key=lambda r: r["parameters"])
        xs = [r["parameters"] / 1e9 for r in mine]
        ax_t.plot(xs, [r["seconds"] for r in mine], style, label=method)
        ax_m.plot(xs, [r["peak_rss_bytes"] / 2**30 for r in mine], style, label=method)
        ax_f.plot(xs, [r["needed_bytes"] / 2**20 for r in mine], style, label=method)
    sizes = sorted({r["parameters"] for r in runs})
    ax_m.plot([p / 1e9 for p in sizes], [4 * p / 2**30 for p in sizes], "k:", label="float32 weights")
    ax_m.axhline(24, color="r", lw=0.8, ls="--", label="this machine (24 GiB)")
    for ax, label in ((ax_t, "seconds to round 0 (imports excluded)"), (ax_m, "peak RSS (GiB)"),
                      (ax_f, "model files needed (MiB)")):
        ax.set_xlabel("model parameters (billions)")
        ax.set_ylabel(label)
        ax.set_xscale("log")
        ax.set_yscale("linear" if ax is ax_t else "log")
        ax.set_xticks([p / 1e9 for p in sizes], [f"{p / 1e9:.2g}" for p in sizes])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_t.set_ylim(bottom=0)
    fig.suptitle("Aggregator start: round 0 from the config (skeleton) vs from the loaded model")
    save_figure(fig, "aggregator_start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="Starts per model and method (fastest kept, all recorded).")
    parser.add_argument("--keep", action="store_true", help=f"Keep the checkpoints under {ROOT} for a later run.")
    parser.add_argument("--plot-only", action="store_true", help="Redraw the plot from results/aggregator_start.json.")
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "PATH", "STORE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]), Path(args.worker[2]))
        return
    if args.plot_only:
        plot(json.loads((RESULTS / "aggregator_start.json").read_text())["runs"])
        return
    runs = []
    for name in SHAPES:
        t0 = time.perf_counter()
        path = prepare(name)
        print(f"{name}: {parameters(name) / 1e9:.2f}B parameters, folder ready in {time.perf_counter() - t0:.1f}s", flush=True)
        for method in ("skeleton", "full_model") if name in FULL_MODEL else ("skeleton",):
            tries = [run_worker(__file__, [method, str(path), str(ROOT / f"store-{name}-{method}")]) for _ in range(args.repeats)]
            best = min(tries, key=lambda r: r["seconds"])
            runs.append({"model": name, "parameters": parameters(name), **best, "needed_bytes": needed_bytes(path, method),
                         "all_seconds": [r["seconds"] for r in tries], "all_peak_rss_bytes": [r["peak_rss_bytes"] for r in tries]})
            print(f"  {method}: {best['seconds']:.2f}s, peak RSS {best['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    for name in FULL_MODEL:
        a, b = (next(r for r in runs if r["model"] == name and r["method"] == m) for m in ("skeleton", "full_model"))
        a["same_round0_as_full_model"] = a["adapter_sha256"] == b["adapter_sha256"]
    write_json("aggregator_start", {"labels": LABELS, "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]},
                                    "repeats": args.repeats, "runs": runs})
    plot(runs)
    if not args.keep:
        shutil.rmtree(ROOT, ignore_errors=True)


if __name__ == "__main__":
    main()
