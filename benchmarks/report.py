"""Regenerate BENCHMARKS.md (repository root) from every benchmarks/results/*.json.

Every number in BENCHMARKS.md comes from those files; nothing is typed by hand. Each section says
the command that produced it and the machine it ran on.

    .venv/bin/python benchmarks/report.py
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS  # noqa: E402

MiB, KiB = 2**20, 2**10


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def provenance(data: dict) -> str:
    m = data["machine"]
    return (f"Command: `{data['command']}`  \n"
            f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, {m['memory_gib']} GiB RAM; Python {m['python']}, torch {m['torch']}; "
            f"{m['date']} (1-min load average {m['load_average_1min']} when written; the machine is shared)")


def figures(name: str) -> str:
    """Links to results/<name>.png and results/<name>_*.png (except another result's own plot)."""
    mine = [p for p in sorted(RESULTS.glob(f"{name}*.png")) if p.stem == name
            or (p.stem.startswith(f"{name}_") and not p.with_suffix(".json").exists())]
    return "\n".join(f"![{p.stem}]({p.relative_to(REPO).as_posix()})" for p in mine)


def met(ok: bool) -> str:
    return "met" if ok else "**missed**"


# ---- one renderer per benchmark script -----------------------------------------------------------------
def aggregation(data: dict) -> str:
    bw = data["bandwidth"]
    adapter = data["adapter_bytes"]
    out = [
        f"FedAvg of K client updates shaped like a Llama-2-7B LoRA adapter ({data['adapter_parameters']:,} parameters, "
        f"{data['dtype']}, {adapter / MiB:.1f} MiB per safetensors file), each method in a fresh process, "
        f"{data['threads']} torch thread(s), fastest of {data['repeats']} runs (median beside it); Flower {data['flwr_version']}.",
        "",
        "Bandwidths measured in the same run (fastest of 1 thread and the aggregator's threads): page-cache read "
        + ", ".join(f"{v / 1e9:.1f} GB/s (K = {k})" for k, v in bw["page_cache_read_bytes_per_s"].items())
        + f"; in-memory read (sum) {bw['sum_bytes_per_s'] / 1e9:.1f} GB/s, memcpy {bw['memcpy_bytes_per_s'] / 1e9:.1f} GB/s. "
        f"Bound = {bw['bound']}: " + ", ".join(f"{v / 1e9:.1f} GB/s (K = {k})" for k, v in bw["bound_bytes_per_s"].items()) + ".",
        "",
    ]
    out += [
        "Methods: `ours` = the library's path (`get_strategy(config).aggregator(state).accept_files(files)`: headers "
        "checked, then 4 MiB runs of back-to-back tensors, each run of every client read where it lies in the page cache (mapped, unmapped after use) while that "
        f"run's running means stay in cache, in {data.get('aggregator_threads', 2)} worker threads, values checked); `ours_store` = the "
        "same after `fetch_update_files` checks each file's sha256 in threads (what `aggregate_round` does); `ours_accept` = "
        "`accept()` one update at a time, each file loaded by safetensors (memory-mapped); `flower` = "
        "`flwr.server.strategy.aggregate.aggregate` over numpy arrays of every update; `flower_message` = "
        "`aggregate_arrayrecords`, what Flower's current (Message API) FedAvg calls; `naive` = load every file, "
        "stack each tensor over clients, weighted mean. Peak RSS counts the touched pages of memory-mapped files "
        "(safetensors loads by mmap): naive's grows with K because it maps every file at once. `result vs ours`: "
        "relative difference of the sum and sum of squares of the averaged tensors.",
        "",
    ]
    if data["dtype"] != "float32":
        out[-1:] = [f"Flower works in float32 (numpy has no {data['dtype']}): its runs convert every update on load and "
                    f"return float32, while ours and naive round the mean to {data['dtype']}; that rounding is its "
                    "difference to ours.", ""]
    rows = []
    for r in data["runs"]:
        if "skipped" in r:
            rows.append([r["clients"], r["method"], "skipped", "", "", r["skipped"], ""])
            continue
        rows.append([
            r["clients"], r["method"], f"{r['seconds']:.2f} ({r['seconds_median']:.2f})",
            f"{r['throughput_bytes_per_s'] / 1e9:.2f}", f"{100 * r['fraction_of_bound']:.0f}%",
            f"{r['peak_above_baseline_bytes'] / MiB:,.0f} ({r['peak_above_baseline_adapters']:.1f}x)",
            f"{r.get('relative_difference_to_ours', 0):.1e}",
        ])
    out.append(table(["K", "method", "wall s (median)", "GB/s", "of bound", "peak RSS above baseline, MiB (adapters)",
                      "result vs ours (rel.)"], rows))
    ours = [r for r in data["runs"] if r["method"] == "ours" and "seconds" in r]
    t = data["targets"]
    target_rows = []
    for r in ours:
        speed = r.get("speedup_vs_naive")
        target_rows.append([
            r["clients"],
            f"{100 * r['fraction_of_bound']:.0f}% ({met(r['fraction_of_bound'] >= t['fraction_of_bound'])})",
            f"{r['peak_above_baseline_adapters']:.2f}x ({met(r['peak_above_baseline_adapters'] < t['peak_above_baseline_adapters'])})",
            f"{speed:.1f}x ({met(speed >= t['speedup_vs_naive'])})" if speed else "n/a",
            *(f"{r[k]:.1f}x" if k in r else "n/a" for k in ("speedup_vs_flower", "speedup_vs_flower_message")),
        ])
    if b := data.get("ours_breakdown"):
        per = b["seconds_per_client"]
        out += ["", f"Where `ours` spends its time (K = {b['clients']}, ms per client): "
                + ", ".join(f"{k} {1e3 * v:.1f}" for k, v in per.items() if k != "result")
                + f"; result() once {1e3 * per['result']:.0f} ms ({b['note']}). "
                f"Reading one adapter at the bound would take {1e3 * adapter / min(bw['bound_bytes_per_s'].values()):.1f} ms."]
    if f := data.get("fold_arithmetic"):
        names = {"lerp": "a running mean (`lerp_`, what `ours` keeps)", "weighted_sum": "a weighted sum (`add_` with a weight)"}
        out += ["", f["note"][0].upper() + f["note"][1:] + ". Throughput: "
                + "; ".join(f"{names[op]} {bps / 1e9:.1f} GB/s, "
                            + ", ".join(f"{100 * x:.0f}%" for x in f["fraction_of_bound"][op].values())
                            + f" of the bound (K = {', '.join(f['fraction_of_bound'][op])})"
                            for op, bps in f["bytes_per_s"].items())
                + ". Reading the files costs CPU time on top of this, on the same cores."]
    out += ["", "Targets for `ours` (the library's streaming path):", "",
            table(["K", f">= {100 * t['fraction_of_bound']:.0f}% of bound", f"peak < {t['peak_above_baseline_adapters']:.0f} adapters",
                   f">= {t['speedup_vs_naive']:.0f}x faster than naive", "vs flower", "vs flower_message"], target_rows)]
    return "\n".join(out)


def communication(data: dict) -> str:
    c = data["communication"]
    out = [
        f"{data['model']}, LoRA rank {data['rank']} on query/value plus the 3-class head (uploaded by every strategy). "
        f"{c['clients']} clients, {c['rounds']} rounds of {c['local_steps']} local steps; HetLoRA client ranks "
        f"{c['hetlora_client_ranks']}. Mean bytes per client per round, measured as file sizes at a LocalStore.",
        "",
    ]
    rows = []
    for r in c["summary"]:
        rows.append([
            r["strategy"], f"{r['upload_lora_bytes'] / KiB:.1f}", f"{r.get('upload_lora_vs_fedit', float('nan')):.2f}",
            f"{r['upload_other_bytes'] / KiB:.1f}", f"{r['upload_file_bytes'] / KiB:.1f}", f"{r.get('upload_file_vs_fedit', float('nan')):.2f}",
            f"{r['download_lora_bytes'] / KiB:.1f}", f"{r['download_lora_bytes_last_round'] / KiB:.1f}", f"{r['download_file_bytes'] / KiB:.1f}",
        ])
    out.append(table(["strategy", "upload LoRA KiB", "vs FedIT", "upload head KiB", "upload files KiB", "files vs FedIT",
                      "download LoRA KiB", "download LoRA KiB, last round", "download files KiB"], rows))
    het = next((r for r in c["summary"] if "upload_lora_bytes_per_rank" in r), None)
    if het:
        per_rank = ", ".join(f"{v:,.0f}" for v in het["upload_lora_bytes_per_rank"])
        out += ["", f"HetLoRA: LoRA upload bytes divided by the client's rank, over every upload: {per_rank} "
                    "(one value: upload proportional to rank)."]
    o = data["overhead"]
    if o["strategies"]:
        rows = [[s["strategy"], len(s["rounds"]), f"{s['wall_s'] / len(s['rounds']):.2f}", f"{s['steps_s'] / len(s['rounds']):.2f}",
                 f"{100 * s['overhead_share']:.1f}% ({met(s['overhead_share'] < o['target_share'])})",
                 f"{100 * s['outside_train_loop_share']:.1f}%"] for s in o["strategies"]]
        out += ["", f"Federation overhead in `run_simulation` ({o['setting']}; torch threads {data['torch_threads']}): "
                    "round wall time minus time inside training steps, as a share of the round "
                    f"(target < {100 * o['target_share']:.0f}%). The last column counts only what lies outside "
                    "Trainer.train's loop (on_train_begin to on_train_end): each client round's Trainer setup, the "
                    "strategy's client setup and payload, aggregation and publishing.",
                "",
                table(["strategy", "rounds", "round s", "in steps s", "outside steps", "outside Trainer.train loop"], rows)]
    return "\n".join(out)


def rank1_regression(data: dict) -> str:
    s = data["setting"]
    out = [
        f"d = {s['d']}, m = {s['m']}, {s['clients']} clients, heterogeneity h = {s['heterogeneity']}, noise {s['noise']}, "
        f"{s['local_steps']} local gradient steps of rate {s['lr']}, {s['rounds']} rounds; median over {s['seeds']} seeds. "
        "The federated loss includes what no shared rank-1 model can fit (the heads differ).",
    ]
    for label, setting in data["settings"].items():
        rows = [[m, f"{r['sin_angle_median'][0]:.3f}", f"{r['final_sin_angle']:.2e}", f"{r['final_relative_error']:.2e}",
                 f"{r['final_federated_loss']:.5f}",
                 r["first_round_sin_below_1e-3"] if r["first_round_sin_below_1e-3"] is not None else "never"]
                for m, r in setting["methods"].items()]
        out += ["", f"{label}:", "", table(["method", "sin(angle) at start", "sin(angle) at end", "rel. error at end",
                                             "federated loss at end", "first round sin < 1e-3"], rows)]
    return "\n".join(out)


def _mean_std(mean: float, std: float | None) -> str:
    return f"{mean:.3f}" + (f" ± {std:.3f}" if std is not None else "")


def quality(data: dict) -> str:
    st, runs = data["settings"], data["runs"]
    head = {"probe-frozen": f"a linear probe fitted on {st.get('probe_examples')} labelled training tweets, then frozen "
                            "(the same for every method; only the LoRA factors are federated)",
            "probe": f"a linear probe fitted on {st.get('probe_examples')} labelled training tweets, then trained and "
                     "averaged with the LoRA factors",
            "fresh": "fresh (random), trained and averaged with the LoRA factors"}[st.get("head", "fresh")]
    planned = data.get("planned_runs", len(runs))
    out = [
        f"all-MiniLM-L6-v2 + LoRA on query/value, Twitter sentiment ({st['train_examples']} training tweets, "
        f"{st['eval_examples']} held out), {st['rounds']} rounds, {st['clients_per_round']} clients per round x "
        f"{st['local_steps']} local steps (3-client setting: all 3 clients each round, "
        f"{st['local_steps'] * st['clients_per_round'] // 3} local steps each), lr {st['lr']}; "
        f"classification head: {head}. Centralized = a plain Trainer on the pooled data for the same "
        f"number of optimizer steps. `start` = accuracy of the global model before round 1; final round; "
        f"mean ± sample std over seeds where there are several. {len(runs)} runs recorded"
        + (" (a --quick smoke run: not a result)." if st.get("quick") else ".")
        + (f" PARTIAL: {len(runs)} of the {planned} planned runs (the benchmark resumes where it stopped)." if planned > len(runs) else ""),
        "",
    ]
    starts: dict[tuple, list[float]] = {}
    for r in runs.values():
        starts.setdefault((r["alpha"], r["rank"], r["clients"], r["method"]), []).append(r["accuracy"][0])
    rows = [[r["alpha"] if r["alpha"] is not None else "pooled", r["rank"], r["clients"], r["method"], r["seeds"],
             f"{statistics.fmean(starts[(r['alpha'], r['rank'], r['clients'], r['method'])]):.3f}",
             _mean_std(r["accuracy_mean"], r["accuracy_std"]), _mean_std(r["macro_f1_mean"], r["macro_f1_std"]),
             _mean_std(r["accuracy_last_rounds_mean"], r["accuracy_last_rounds_std"])]
            for r in data["summary"]]
    out.append(table(["Dirichlet alpha", "rank", "clients", "method", "seeds", "start", "accuracy", "macro-F1",
                      f"accuracy, mean of last {data['last_rounds']} rounds"], rows))
    out += ["", *_rolora_claim(data["summary"], st["clients"], "accuracy", "final accuracy")]
    out += ["", *_rolora_claim(data["summary"], st["clients"], "accuracy_last_rounds",
                               f"accuracy averaged over the last {data['last_rounds']} rounds")]
    return "\n".join(out)


def _rolora_claim(summary: list[dict], clients: int, metric: str, measure: str) -> list[str]:
    """RoLoRA's claim (many skewed clients: clearly above FedIT and FFA-LoRA; few clients: all close),
    read off the summary's `metric`: "clearly" = the gap is larger than the seed spread of either side."""
    lines = [f"RoLoRA's claim, as measured ({measure}, mean over seeds):", ""]
    for label, k in (("many clients", clients), ("few clients", 3)):
        rows = {r["method"]: r for r in summary if (r["alpha"], r["rank"], r["clients"]) == (0.1, 8, k)}
        if not {"rolora", "fedit", "ffa"} <= rows.keys():
            lines.append(f"- {label} ({k}, alpha 0.1, rank 8): not all of rolora, fedit, ffa measured yet.")
            continue
        ro, parts = rows["rolora"], []
        for other in ("fedit", "ffa"):
            o = rows[other]
            gap, seeds = ro[f"{metric}_mean"] - o[f"{metric}_mean"], min(ro["seeds"], o["seeds"])
            if seeds < 2:
                parts.append(f"{'above' if gap > 0 else 'below'} {other} ({gap:+.3f}; one seed: no spread to judge by)")
                continue
            spread = max(ro[f"{metric}_std"], o[f"{metric}_std"])
            verdict = ("clearly above" if gap > spread else "clearly below" if -gap > spread else "within the seed spread of")
            parts.append(f"{verdict} {other} ({gap:+.3f}; spread {spread:.3f} over {seeds} seeds)")
        lines.append(f"- {label} ({k}, alpha 0.1, rank 8): rolora {ro[f'{metric}_mean']:.3f} is " + " and ".join(parts) + ".")
    return lines


# Each paper's claim in the comparison: (settings, method, against, metric, kind, the claim in words), judged
# in each setting named. kind "above": the method beats the other by more than the seed spread; "close": within
# 0.01 (within the spread only: within noise). FedEx-LoRA, FLoRA and LoRA-FAIR measure mostly near-IID
# clients: their claims are judged at alpha 1.0 too.
_CLAIMS = [
    (("many_clients",), "rolora", "fedit", "accuracy", "above", "RoLoRA beats FedIT with many skewed clients at rank 2"),
    (("many_clients",), "rolora", "ffa", "accuracy", "above", "RoLoRA beats FFA-LoRA with many skewed clients at rank 2"),
    (("few_clients",), "rolora", "fedit", "accuracy", "close", "with 3 clients RoLoRA and FedIT are within about a point"),
    (("headline", "mild_skew"), "ffa", "fedit", "accuracy", "close", "FFA-LoRA matches FedIT with half the upload"),
    (("headline", "mild_skew"), "fedex", "fedit", "accuracy", "above", "FedEx-LoRA's exact aggregation beats FedIT"),
    (("headline", "mild_skew"), "flora", "fedit", "accuracy", "above", "FLoRA's stacking beats FedIT"),
    (("headline", "mild_skew"), "lora_fair", "fedit", "accuracy", "above", "LoRA-FAIR's server refinement beats FedIT"),
    (("headline",), "flexlora", "hetlora", "accuracy", "above", "FlexLoRA beats HetLoRA on the same mixed ranks"),
    (("headline",), "fedsvd", "ffa", "accuracy", "above", "FedSVD's re-factored A beats FFA-LoRA's frozen A"),
    (("headline", "mild_skew"), "fedsa", "fedit", "personal_vs_client", "above",
     "FedSA-LoRA's personalized models beat FedIT's global model on each client's own test split"),
]
CLAIMS = [(setting, *claim) for settings, *claim in _CLAIMS for setting in settings]


def comparison(data: dict) -> str:
    st, runs, rows = data["settings"], data["runs"], data["summary"]
    grid = data["setting_grid"]
    groups = {(r["setting"], r["method"]) for r in runs.values()}
    out = [
        f"all-MiniLM-L6-v2 + LoRA on query/value, Twitter sentiment ({st['train_examples']} tweets; {st['probe_examples']} "
        f"for the frozen linear-probe head, {st['val_examples']} for validation, the rest to the clients, each keeping 20% "
        f"(at most {st['client_test_max']}) as its own test split; {st['eval_examples']} test tweets). Every federation: "
        f"{st['rounds']} rounds of {st['clients_per_round']} clients x {st['local_steps']} local steps (3 clients: all of "
        "them, the same steps per round), AdamW with cosine over the federation"
        + (f", clients with logit adjustment tau = {st['logit_adjustment']:g}" if st.get("logit_adjustment") else ", plain logits")
        + f". Each method's learning rate is chosen from {', '.join(f'{x:g}' for x in st['lrs'])} by validation accuracy "
        f"(mean of the last 3 rounds, seed 0), then {st['seeds']} seeds run at it. Centralized LoRA: a plain Trainer on the "
        "pooled client data, the same optimizer steps, tuned the same way. `start`: before round 1. Test figures at the "
        "last round, mean ± sample std over seeds; `clients`: the global model's mean accuracy over the clients' own "
        "splits (worst client in brackets); `personal`: each client's personalized model on its split (fedsa)."
        + (f" PARTIAL: {len(runs)} of the {data['planned_runs']} runs of the whole grid (it resumes where it stopped)."
           if data.get("planned_runs", 0) > len(runs) else ""),
        "",
    ]
    for setting, sp in grid.items():
        mine = [r for r in rows if r["setting"] == setting]
        started = sorted(m for (s_, m) in groups if s_ == setting)
        if not mine and not started:
            continue
        out += [f"**{setting}** (Dirichlet alpha {sp['alpha']}, rank {sp['rank']}, {sp['clients']} clients)", ""]
        if mine:
            out.append(table(
                ["method", "lr", "validation by lr", "seeds", "start", "accuracy", "last 3 rounds", "macro-F1", "clients", "personal"],
                [[r["method"], f"{r['lr']:g}", ", ".join(f"{k}: {v:.3f}" for k, v in r["val_by_lr"].items()), r["seeds"],
                  f"{r['start_accuracy']:.3f}", _mean_std(r["accuracy_mean"], r["accuracy_std"]),
                  _mean_std(r["accuracy_last_mean"], r["accuracy_last_std"]), _mean_std(r["macro_f1_mean"], r["macro_f1_std"]),
                  f"{r['client_accuracy_mean']:.3f} ({r['client_worst_mean']:.3f})" if "client_accuracy_mean" in r else "",
                  f"{r['personal_accuracy_mean']:.3f} ({r['personal_worst_mean']:.3f})" if "personal_accuracy_mean" in r else ""]
                 for r in mine]))
        tuning = [r for r in runs.values() if r["setting"] == setting and r["method"] not in {x["method"] for x in mine}]
        if tuning:
            out += ["", "Tuning still in progress (seed 0; validation accuracy, test accuracy at the last round):", "",
                    table(["method", "lr", "validation", "start", "accuracy"],
                          [[r["method"], f"{r['lr']:g}", f"{statistics.fmean(r['val_accuracy']):.3f}", f"{r['accuracy'][0]:.3f}",
                            f"{r['accuracy'][-1]:.3f}"] for r in sorted(tuning, key=lambda r: (r["method"], r["lr"]))])]
        out.append("")
    out += _federation_gains(rows) + [""] + _verdicts(rows)
    return "\n".join(out)


def _federation_gains(rows: list[dict]) -> list[str]:
    head = [r for r in rows if r["setting"] == "headline"]
    fed = [r for r in head if r["method"] not in ("centralized", "fedsa")]  # fedsa's global model is its start (B = 0)
    central = next((r for r in head if r["method"] == "centralized"), None)
    if not fed:
        return ["Federation gains (headline setting): no method tuned yet."]
    best = max(fed, key=lambda r: r["accuracy_mean"])
    line = (f"Federation gains (headline setting): the best federated method, {best['method']}, ends at "
            f"{best['accuracy_mean']:.3f} from a start of {best['start_accuracy']:.3f} ({best['accuracy_mean'] - best['start_accuracy']:+.3f}, "
            f"{best['seeds']} seeds)")
    if central is not None:
        line += f"; centralized LoRA {central['accuracy_mean']:.3f}, a gap of {central['accuracy_mean'] - best['accuracy_mean']:.3f}"
    return [line + "."]


def _verdicts(rows: list[dict]) -> list[str]:
    """Each claim: reproduced, not reproduced, or within noise, judged against the larger seed std."""
    by = {(r["setting"], r["method"]): r for r in rows}
    if not any((s, m) in by and (s, o) in by for s, m, o, *_ in CLAIMS):
        return ["Paper claims: none measured yet (each needs both of its methods tuned and run over the seeds)."]
    lines = ["Paper claims, as measured (test accuracy at the last round, mean over seeds; noise = the larger seed std):", ""]
    for setting, method, other, metric, kind, claim in CLAIMS:
        a, b = by.get((setting, method)), by.get((setting, other))
        if a is None or b is None:
            lines.append(f"- {claim} ({setting}): not measured yet.")
            continue
        if metric == "personal_vs_client":
            x, y = a.get("personal_accuracy_mean"), b.get("client_accuracy_mean")
            sx, sy = a.get("personal_accuracy_std"), b.get("client_accuracy_std")
        else:
            x, y, sx, sy = a[f"{metric}_mean"], b[f"{metric}_mean"], a[f"{metric}_std"], b[f"{metric}_std"]
        if x is None or y is None:
            lines.append(f"- {claim} ({setting}): not measured yet.")
            continue
        seeds = min(a["seeds"], b["seeds"])
        noise = max(sx or 0.0, sy or 0.0)
        gap = x - y
        if seeds < 2:
            verdict = "one seed: no spread to judge by"
        elif kind == "close":
            verdict = "reproduced" if abs(gap) <= 0.01 else "within noise" if abs(gap) <= noise else "not reproduced"
        else:
            verdict = "reproduced" if gap > noise else "not reproduced" if gap < -noise else "within noise"
        lines.append(f"- {claim} ({setting}): {method} {x:.3f} vs {other} {y:.3f} ({gap:+.3f}; noise {noise:.3f}, "
                     f"{seeds} seeds): **{verdict}**.")
    return lines


def digits(data: dict) -> str:
    st = data["settings"]
    pre = data["pretrained_on_0_4_accuracy_all_digits"]
    out = [
        f"MLP pretrained on the digits 0-4, then LoRA r={st['rank']} (fc1, fc2; head trained in full) fine-tuned to all ten "
        f"digits by {st['clients']} clients with Dirichlet alpha={st['alpha']}, {st['rounds']} rounds of "
        f"{st['clients_per_round']} clients x {st['local_steps']} local steps, lr {st['lr']}. Test accuracy before "
        f"federation: {statistics.fmean(pre):.3f}. Final round, mean ± sample std over {st['seeds']} seed(s)"
        + (" (a --quick smoke run: not a result)." if st.get("quick") else "."),
        "",
        table(["method", "seeds", "accuracy"], [[r["method"], r["seeds"], _mean_std(r["accuracy_mean"], r["accuracy_std"])]
                                                for r in data["summary"]]),
    ]
    return "\n".join(out)


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def aggregator_start(data: dict) -> str:
    GiB = 2**30
    runs = data["runs"]
    out = [
        f"Round 0 of a SEQ_CLS federation (LoRA r={data['lora']['r']} on {', '.join(data['lora']['target_modules'])}, "
        f"a {data['labels']}-label score head trained with the adapter) published in a LocalStore, each start in a fresh "
        f"process, fastest of {data['repeats']}. `skeleton` = `peft-federated aggregate` now (`roles.start_aggregator`: "
        "the model built from config.json on the meta device, the head read alone from the checkpoint, or drawn from "
        "init_seed where the folder holds only config.json, as for the 7B); `full_model` = before (the whole model loaded "
        "with `from_pretrained`, then round 0). Seconds exclude the imports; peak RSS is the process's (VmHWM, imports "
        "included; `RSS before` is after the imports). `model files needed`: what the path reads or needs present in the "
        "model folder (a Hub download would fetch as much). transformers 5 memory-maps a safetensors checkpoint of the "
        "dtype it loads, so the full-model path touches few of its pages and stays fast while the files are on local disk "
        "(here in the page cache); it needs the whole checkpoint there, and the 7B's float32 weights would not fit in "
        "this machine's memory once touched, so it runs up to 1.3B.",
        "",
    ]
    rows = []
    for r in runs:
        same = r.get("same_round0_as_full_model")
        rows.append([r["model"], f"{r['parameters'] / 1e9:.2f}B", f"{4 * r['parameters'] / GiB:.1f} GiB", r["method"],
                     f"{r['seconds']:.2f}", f"{r['peak_rss_bytes'] / GiB:.2f} GiB", f"{r['rss_before_bytes'] / GiB:.2f} GiB",
                     _size(r["needed_bytes"]), "" if same is None else ("yes" if same else "**no**")])
    out.append(table(["model", "parameters", "float32 weights", "method", "seconds to round 0", "peak RSS", "RSS before",
                      "model files needed", "same round 0 as full_model"], rows))
    out.append("")
    for model in dict.fromkeys(r["model"] for r in runs):
        mine = {r["method"]: r for r in runs if r["model"] == model}
        sk = mine["skeleton"]
        if "full_model" in mine:
            full = mine["full_model"]
            out.append(f"- {model}: full_model / skeleton = {full['seconds'] / sk['seconds']:.2f}x the time, "
                       f"{full['peak_rss_bytes'] / sk['peak_rss_bytes']:.2f}x the peak RSS, "
                       f"{full['needed_bytes'] / sk['needed_bytes']:,.0f}x the model files.")
        else:
            out.append(f"- {model}: the skeleton publishes round 0 in {sk['seconds']:.2f} s with a peak RSS of "
                       f"{sk['peak_rss_bytes'] / GiB:.2f} GiB from {_size(sk['needed_bytes'])} of model files; loading the "
                       f"model would need its {4 * sk['parameters'] / GiB:.1f} GiB of float32 weights on disk (or downloaded).")
    return "\n".join(out)


def llm_instruction_tuning(data: dict) -> str:
    st, sec, central = data["settings"], data["seconds"], data["centralized"]
    out = [
        f"{st['model_name']} + LoRA r={st['rank']} (alpha {st['lora_alpha']}) on {st['target_modules']}, "
        f"{st['clients']} clients (Dirichlet alpha={st['alpha']} label skew, each its own phrasing of the question), "
        f"`{st['strategy']}`, {st['rounds']} rounds of {st['clients_per_round']} clients x {st['local_steps']} local steps, "
        f"batch {st['batch_size']}, lr {st['learning_rate']} (cosine); {st['train_examples']} training tweets, "
        f"{st['eval_examples']} held out (majority-class rate {data['majority_class_rate']:.3f}). Accuracy: exact match of "
        "the highest-likelihood label word given the prompt; loss: nats per token on the true answer word. "
        f"Centralized: plain `SFTTrainer` on the pooled data, {st['steps']} steps (as many as all clients together).",
        "",
        table(["model", "held-out accuracy", "held-out answer loss"],
              [["before federation", f"{data['before']['accuracy']:.3f}", f"{data['before']['answer_loss']:.3f}"],
               [f"federated, round {st['rounds']}", f"{data['federated']['accuracy']:.3f}", f"{data['federated']['answer_loss']:.3f}"]]
              + ([["centralized SFT, same steps", f"{central['accuracy']:.3f}", f"{central['answer_loss']:.3f}"]] if central else [])),
        "",
        "Accuracy per round: " + ", ".join(f"{r['accuracy']:.3f}" for r in data["rounds"]) + ".",
        "",
        f"Time: {sec['total'] / 60:.1f} min in all (federation {sec['federation']:.0f} s including its "
        f"{len(data['rounds'])} evaluations, centralized {sec['centralized']:.0f} s), torch threads: {st['threads'] or 'default'}, "
        f"1-minute load average at the end {data['machine']['load_average_1min']} on {data['machine']['cpu_count']} cores"
        + (": other work shared the CPU, so these times are pessimistic." if data["machine"]["load_average_1min"] > data["machine"]["cpu_count"]
           else "."),
    ]
    return "\n".join(out)


def flower(data: dict) -> str:
    st, GiB = data["settings"], 2**30

    def seconds(value, sign=""):
        return "n/a" if value is None else f"{value:{sign}.2f}"

    rows = []
    for r in data["runs"]:
        engine = "ours (`run_simulation`)" if r["engine"] == "ours" else f"Flower, {r['actors']} actor{'s' if r['actors'] > 1 else ''}"
        rows.append([r["clients"], engine, f"{r['per_round_s']:.2f}", f"{r['per_round_vs_ours']:.2f}x", seconds(r["outside_train_s"]),
                     seconds(r.get("overhead_s_per_round"), "+") if r["engine"] == "flower" else "", f"{r['first_round_s']:.1f}",
                     f"{r['startup_s']:.1f}", f"{r['peak_pss_bytes'] / GiB:.2f}", f"{r['peak_pss_vs_ours']:.2f}x", f"{r['peak_rss_bytes'] / GiB:.2f}"])
    loaded = data["machine"]["load_average_1min"] > data["machine"]["cpu_count"]
    return "\n".join([
        f"The same federation both ways: MiniLM + LoRA r=8 (`{data['strategy']}`), every client in every round, "
        f"{st['local_steps']} local steps of batch {st['batch_size']} ({st['examples_per_client']} tweets per client), "
        f"{st['rounds']} rounds, each published to a LocalStore, no evaluation, {st['threads']} torch thread(s) per client. Ours: "
        f"`run_simulation` in one process; Flower {data['flwr_version']}: its simulation engine (Ray) with `FederatedLoraStrategy` "
        "and `client_app`, N supernodes served by 1 Ray actor (clients in turn, as ours) or 2 (two at a time). Per round: "
        "median after the first round of the wall time between two publishes, and of that time outside the clients' "
        "`Trainer.train()` (their `train_runtime`; clients in turn only): Flower's overhead per round is its excess over ours, "
        "measured where the training's speed, which swings with the machine's other jobs, does not enter. First round: "
        "Ray's actors start and the nodes are asked their client ids; start: process start to round 0. Memory: peak of the "
        "summed PSS (and RSS) over the run's whole process tree, Ray's processes included.",
        "",
        table(["clients", "engine", "s / round", "vs ours", "outside train() s / round", "Flower overhead s / round",
               "first round s", "start s", "peak PSS GiB", "vs ours", "peak RSS GiB"], rows),
        "",
        ("Other work shared the CPU during the run (1-minute load average "
         f"{data['machine']['load_average_1min']} on {data['machine']['cpu_count']} cores when it ended), so the times are "
         "pessimistic and the wall times noisy; the runs were sequential.") if loaded else
        "The machine was otherwise idle; the runs were sequential.",
    ])


def dp_quality(data: dict) -> str:
    st, rows = data["settings"], data["summary"]
    planned, done = data.get("planned_runs", len(data["runs"])), len(data["runs"])
    out = [
        f"all-MiniLM-L6-v2 + LoRA r={st['rank']} on query/value, Twitter sentiment ({st['train_examples']} training tweets, "
        f"{st['eval_examples']} held out), {st['clients']} clients (Dirichlet alpha={st['alpha']}), {st['rounds']} rounds "
        f"with Poisson sampling of {st['clients_per_round']} expected clients (q = {st['clients_per_round'] / st['clients']:.2f}) "
        f"x {st['local_steps']} local steps, lr {st['lr']}, uniform weights, clip norm C = {st['clip_norm']}, "
        f"delta = {st['delta']:g}; sigma calibrated by dp-accounting (RDP) so that the {st['rounds']} rounds spend exactly "
        "epsilon; epsilon = inf is the same federation clipped but not noised. Head: the quality benchmark's frozen linear "
        "probe (noised with the rest of each upload). `start`: accuracy before round 1; then the final round's test "
        "accuracy and macro-F1, mean ± sample std over seeds."
        + (" (a --quick smoke run: not a result.)" if st.get("quick") else "")
        + (f" PARTIAL: {done} of the {planned} planned runs (the benchmark resumes where it stopped)." if planned > done else ""),
        "",
        table(["method", "epsilon", "sigma", "seeds", "start", "accuracy", "macro-F1"],
              [[r["method"], "inf" if r["epsilon"] == float("inf") else f"{r['epsilon']:g}", f"{r['noise_multiplier']:.3f}",
                r["seeds"], f"{r['start_accuracy']:.3f}", _mean_std(r["accuracy_mean"], r["accuracy_std"]),
                f"{r['macro_f1_mean']:.3f}"] for r in rows]),
        "",
        *_ffa_claim(rows),
    ]
    return "\n".join(out)


def _ffa_claim(rows: list[dict]) -> list[str]:
    """FFA-LoRA's claim: under DP it loses less accuracy than FedIT. The loss is each method's drop from its own
    epsilon = inf run; "within the seed spread" when the difference of the drops is below the largest seed std."""
    by = {(r["method"], r["epsilon"]): r for r in rows}
    lines = ["FFA-LoRA's claim (it loses less than FedIT under DP), as measured:", ""]
    for eps in sorted({r["epsilon"] for r in rows if r["epsilon"] != float("inf")}):
        keys = [(m, e) for m in ("ffa", "fedit") for e in (eps, float("inf"))]
        if not all(k in by for k in keys):
            lines.append(f"- epsilon {eps:g}: not all runs measured yet.")
            continue
        drop = {m: by[(m, float("inf"))]["accuracy_mean"] - by[(m, eps)]["accuracy_mean"] for m in ("ffa", "fedit")}
        spread = max(by[k]["accuracy_std"] for k in keys)
        seeds = min(by[k]["seeds"] for k in keys)
        gap = drop["fedit"] - drop["ffa"]
        verdict = ("one seed: no spread to judge by" if seeds < 2 else "holds" if gap > spread
                   else "does not hold" if -gap > spread else "within the seed spread")
        lines.append(f"- epsilon {eps:g}: FFA loses {drop['ffa']:.3f} accuracy, FedIT {drop['fedit']:.3f} (difference {gap:+.3f}, "
                     f"largest seed std {spread:.3f}, seeds: {seeds}): {verdict}.")
    return lines


def demo_reference(data: dict) -> str:
    d, fed, runs = data["demo_settings"], data.get("demo"), data["runs"]
    steps = runs[0]["settings"]["steps"] if runs else None
    out = [
        f"`peft-federated demo` with its defaults: {d['num_clients']} clients (Dirichlet alpha={d['alpha']}), `{d['strategy']}`, "
        f"{d['num_rounds']} rounds of {d['clients_per_round']} clients x {d['local_steps']} local steps ({steps} optimizer steps "
        f"in all), batch {d['batch_size']}, lr {d['learning_rate']} (cosine over the federation), LoRA r={d['rank']} on query/value; "
        f"the head a linear probe on {d['probe_examples']} seed tweets kept apart from the clients, "
        f"{'frozen' if d['freeze_head'] else 'trained on'}"
        + (f"; the clients train with logit adjustment tau = {d['logit_adjustment']:g}" if d.get("logit_adjustment") else "")
        + ". Centralized: a plain `Trainer` on the clients' tweets pooled "
        "(the same head, LoRA, batch, learning rate and schedule) for the same number of optimizer steps.",
        "",
    ]
    rows = []
    if fed:
        rows += [["majority class", f"{fed['majority_class_rate']:.3f}", ""],
                 ["before federation (the probe head)", f"{fed['accuracy_before']:.3f}", f"{fed['macro_f1_per_round'][0]:.3f}"],
                 [f"federated, round {d['num_rounds']}", f"**{fed['final_accuracy']:.3f}**", f"**{fed['final_macro_f1']:.3f}**"]]
    rows += [[f"centralized LoRA, {r['settings']['steps']} steps (seed {r['settings']['seed']})", f"{r['final_accuracy']:.3f}",
              f"{r['final_macro_f1']:.3f}"] for r in runs]
    out += [table(["model", "held-out accuracy", "macro-F1"], rows), ""]
    if fed:
        central = next((r for r in runs if r["settings"]["seed"] == d["seed"]), None)
        if central:
            gap = fed["final_accuracy"] - central["final_accuracy"]
            out += [f"Federated - centralized accuracy: {gap:+.3f} (target: within 0.05, {met(gap >= -0.05)}); "
                    f"macro-F1 {fed['final_macro_f1']:.3f} (target: at least 0.60, {met(fed['final_macro_f1'] >= 0.60)}).", ""]
        out += ["Accuracy by round: " + ", ".join(f"{a:.3f} ({r})" for r, a in zip(fed["rounds_evaluated"], fed["accuracy_per_round"]))
                + ".", ""]
        busy = fed["load_average_1min_after"] > 1.25 * data["machine"]["cpu_count"]  # its own threads load every core
        out += [f"The demo took {fed['seconds'] / 60:.1f} min (1-minute load average {fed['load_average_1min_after']} at its end "
                f"on {data['machine']['cpu_count']} cores" + ("; other work shared the CPU, so the time is pessimistic)." if busy else ").")]
    return "\n".join(out)


def headline_drift(data: dict) -> str:
    b = data["base"]
    out = [
        f"FedIT in the comparison's headline setting (Dirichlet alpha 0.1, rank 8, 20 clients, logit adjustment tau "
        f"{b['logit_adjustment']:g}, lr {data['lr']:g} unless the variant says), one change a variant, the same splits and "
        f"seeds. `grid`: the comparison's protocol, {b['rounds']} rounds of {b['clients_per_round']} clients x "
        f"{b['local_steps']} local steps. Test accuracy; `lowest`: the lowest accuracy evaluated along the run (mean over "
        "seeds).",
        "",
    ]
    rows = []
    for r in data["summary"]:
        v = data["variants"][r["variant"]]
        rounds, cpr = v.get("rounds", b["rounds"]), v.get("clients_per_round", b["clients_per_round"])
        steps = rounds * cpr * v.get("local_steps", b["local_steps"])
        change = ", ".join(f"{k}={x}" for k, x in v.items() if k not in ("seeds",)) or "none"
        rows.append([r["variant"], change, steps, ", ".join(str(s) for s in r["seeds"]), f"{r['start']:.3f}",
                     _mean_std(r["final_mean"], r["final_std"]), ", ".join(f"{a:.3f}" for a in r["final"]),
                     f"{r['lowest_mean']:.3f}", f"{r['macro_f1_mean']:.3f}"])
    out.append(table(["variant", "change", "client steps", "seeds", "start", "final", "final per seed", "lowest",
                      "macro-F1"], rows))
    if mixes := data.get("round_mix"):
        def one_class(weighting: str, at: float) -> str:
            rounds = [m for seed in mixes.values() for m in seed[weighting]]
            return f"{sum(max(m) >= at for m in rounds)} of {len(rounds)}"

        out += ["", f"The rounds' label mix under the grid protocol (seeds {', '.join(mixes)}): a round's mean gives one "
                f"class at least 90% of its weight in {one_class('samples', 0.9)} rounds when clients weigh by their sample "
                f"counts, and in {one_class('uniform', 0.9)} rounds when they weigh the same (at least 75%: "
                f"{one_class('samples', 0.75)} and {one_class('uniform', 0.75)})."]
    return "\n".join(out)


RENDERERS: dict[str, tuple[str | Callable[[dict], str], Callable[[dict], str]]] = {
    "aggregation": (lambda d: f"Server-side aggregation, {d['dtype']} updates", aggregation),
    "aggregator_start": ("Aggregator start: round 0 without the base weights", aggregator_start),
    "communication": ("Communication and federation overhead", communication),
    "rank1_regression": ("Rank-1 federated regression (RoLoRA's linear analysis)", rank1_regression),
    "quality": ("Algorithm quality: federated sentiment with every strategy", quality),
    "digits": ("Algorithm quality: a pretrained MLP fine-tuned on digits", digits),
    "llm_instruction_tuning": ("Federated instruction tuning of an LLM (SmolLM2-135M-Instruct)", llm_instruction_tuning),
    "dp_quality": ("Quality under client-level differential privacy (fedit, ffa, rolora)", dp_quality),
    "comparison": (lambda d: "A fair comparison: every strategy with its learning rate tuned"
                   + ("" if d["settings"].get("logit_adjustment") else " (plain logits, no logit adjustment)"), comparison),
    "demo_reference": ("The main job (`peft-federated demo`) against centralized LoRA", demo_reference),
    "flower": ("Flower as the engine: overhead against the in-process simulation", flower),
    "headline_drift": ("Why the headline federation loses ground: FedIT under variants of its protocol", headline_drift),
}


def main() -> None:
    parts = [
        "# Benchmarks",
        "",
        "Generated by `.venv/bin/python benchmarks/report.py` from `benchmarks/results/*.json`: do not edit by hand, "
        "re-run the benchmark and the report. How to run each benchmark: [benchmarks/README.md](benchmarks/README.md). "
        "Speed claims are ratios against a baseline measured in the same run.",
    ]
    for path in sorted(RESULTS.glob("*.json")):
        data = json.loads(path.read_text())
        title, render = RENDERERS.get(data.get("script", data["benchmark"]), (data["benchmark"], None))
        title = title(data) if callable(title) else title
        body = render(data) if render else "(No table yet: add a renderer for this script to `benchmarks/report.py`.)"
        parts += ["", f"## {title} (`{path.relative_to(REPO).as_posix()}`)", "", provenance(data), "", body]
        if pics := figures(data["benchmark"]):
            parts += ["", pics]
    (REPO / "BENCHMARKS.md").write_text("\n".join(parts) + "\n")
    print(f"wrote {REPO / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
