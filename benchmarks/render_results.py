"""Markdown tables for docs/results.md from the benchmarks' JSON files, so no number is copied by hand.

    python benchmarks/render_results.py [--results benchmarks/results] > tables.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def machine_line(r: dict) -> str:
    m = r["machine"]
    end = m.get("loadavg_1m_at_end")
    return (f"Machine: {m['cpu']}, {m['cpu_count']} cores, {m['threads']} threads; Python {m['python']}, torch "
            f"{m['torch']}, torchvision {m['torchvision']}, onnxruntime {m['onnxruntime']}; started {m['utc']}, "
            f"1-min load average {m['loadavg_1m_at_start']:.1f} at start"
            + (f", {end:.1f} at end" if end is not None else "") + f"; wall {r.get('wall_s', 0) / 60:.1f} min.")


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def scratch(r: dict) -> str:
    rows = []
    for arch, modes in r["models"].items():
        e2e = modes["end-to-end"]
        for mode, s in modes.items():
            acc, mem, sec = s["val_acc"], s["train_mem_mb"]["mean"], s["epoch_s"]["mean"]
            rows.append([arch, mode, f"{pct(acc['mean'])} ± {pct(acc['std'])} ({pct(acc['min'])}-{pct(acc['max'])})",
                         f"{s['trainable_params']:,}", f"{s['trainable_params'] / e2e['trainable_params']:.2f}x",
                         f"{mem:.0f} MB", f"{mem / e2e['train_mem_mb']['mean']:.2f}x",
                         f"{sec:.1f}", f"{sec / e2e['epoch_s']['mean']:.2f}x"])
    runs = "; ".join(f"{x['arch']} {x['mode']} seed {x['seed']}: {pct(x['val_acc'])}" for x in r["runs"])
    return "\n\n".join([machine_line(r), table(["model", "mode", "val acc mean ± std (min-max)", "trainable params",
                                                "vs e2e", "training memory", "vs e2e", "s/epoch", "vs e2e"], rows),
                        f"Per run: {runs}."])


def pretrained(r: dict) -> str:
    rows = [[sel, p["k"], " ".join(p["units"]), f"{100 * p['fraction_replaced']:.1f}%", pct(p["acc_converted"]),
             pct(p["acc_calibrated"]), pct(p["acc_finetuned"]), f"{p['kl_before']:.3g} -> {p['kl_after']:.3g}"]
            for sel, points in r["sweeps"].items() for p in points]
    damage = ", ".join(f"{d['unit']} {d['kl']:.3g}" for d in r["damage"])
    return "\n\n".join([machine_line(r), f"Original (pretrained) validation accuracy: {pct(r['original_acc'])}.",
                        table(["selection", "k", "units", "params replaced", "converted", "calibrated", "fine-tuned",
                               "KL to original (calibration)"], rows),
                        f"Measured damage (KL to the original, each unit replaced alone, a and b fitted): {damage}."])


def parameter_free(r: dict) -> str:
    parts = [machine_line(r)]
    if "counts" in r:
        rows = [[n, f"{c['params'] / 1e6:.2f}M", f"{c['macs'] / 1e9:.3f}G", f"{c['params_ratio']:.2f}",
                 f"{c['macs_ratio']:.2f}", {True: "yes", False: "NO"}.get(c.get("matches_paper"), "-")]
                for n, c in r["counts"].items()]
        parts.append(table(["model", "params", "MACs (224px)", "params ratio", "MACs ratio", "= paper"], rows))
    if "latency" in r:
        keys = [k for k in next(iter(r["latency"].values())) if k.endswith("_ms")]
        rows = [[n, *(f"{row[k]:.1f} ({row[k.replace('_ms', '_speedup')]:.2f}x)" for k in keys)]
                for n, row in r["latency"].items()]
        parts.append(table(["model", *(k.removesuffix("_ms").replace("_", " ") for k in keys)], rows))
    for acc in r.get("accuracy", []):
        if "pf-hybrid" not in acc or "val_acc_finetuned" not in acc.get("pf-hybrid", {}):
            continue
        forms = [acc[f] for f in ("original", "pf-all", "pf-hybrid")]
        scratch = all("val_acc_scratch" in f for f in forms[1:])
        rows = [[name, f"{f['params']:,}", *([pct(f.get("val_acc_scratch", f.get("val_acc")))] if scratch else []),
                 pct(f.get("val_acc_converted", f.get("val_acc"))), pct(f["val_acc_finetuned"])]
                for name, f in zip(("original", "pf-all", "pf-hybrid"), forms, strict=True)]
        header = ["form", "params", *(["trained from scratch in this form"] if scratch else []),
                  "after conversion of the trained original" if scratch else
                  "after conversion (original: after training)", "after fine-tuning"]
        parts.append(f"{acc['arch']} on digits at {acc['input_size']}px:\n\n" + table(header, rows))
    return "\n\n".join(parts)


def deployment(r: dict) -> str:
    batches = r["config"]["batches"]
    rts = ("torch", "onnx-fp32", "onnx-int8")
    rows = []
    for form, row in r["forms"].items():
        rows.append([form, f"{row['params'] / 1e6:.1f}M",
                     *(f"{row[rt][f'b{b}_ms']:.1f} ({row[rt][f'b{b}_speedup']:.2f}x)" for rt in rts for b in batches),
                     f"{row['onnx-fp32']['file_mb']:.1f} / {row['onnx-int8']['file_mb']:.1f} MB",
                     pct(row["onnx-int8"]["top1_agreement"])])
    header = ["form", "params", *(f"{rt} b{b}" for rt in rts for b in batches), "fp32 / int8 file",
              "int8 top-1 vs fp32"]
    return "\n\n".join([machine_line(r), table(header, rows)])


def memory_format(r: dict) -> str:
    cols = [f"{fmt}_b{b}" for b in r["config"]["batches"] for fmt in ("nchw", "channels_last")]
    rows = [[n, *(f"{row[c]['median_ms']:.1f} ({row[c]['speedup']:.2f}x)" for c in cols)]
            for n, row in r["latency"].items()]
    parts = [machine_line(r), table(["model", *(c.replace("_b", " b") for c in cols)], rows)]
    if "ops" in r:
        ops = r["ops"]
        parts.append(f"The operations alone on a {'x'.join(map(str, ops['shape']))} tensor (median ms): "
                     + ", ".join(f"{k} {v:.2f}" for k, v in ops["median_ms"].items()) + ".")
    return "\n\n".join(parts)


def bn_stats(r: dict) -> str:
    """benchmarks/bn_stats_recovery.py: agreement with the teacher on held-out images, per arm (mean, min-max over
    seeds), and what keep=best wrote."""
    runs = r["runs"]
    arms = [("teacher, finetune at lr 0, `--bn-stats freeze`", lambda x: x["teacher_lr0"]["freeze"]),
            ("teacher, finetune at lr 0, `--bn-stats update`", lambda x: x["teacher_lr0"]["update"]),
            ("teacher, finetune at lr 0, `--bn-stats recalibrate`", lambda x: x["teacher_lr0"]["recalibrate"]),
            ("converted (every 2, a = b = 0.5)", lambda x: x["converted"]),
            ("calibrated, `--bn-stats freeze`", lambda x: x["calibrated"]["freeze"]),
            ("calibrated, `--bn-stats recalibrate`", lambda x: x["calibrated"]["recalibrate"])]
    for name in runs[0]["finetuned"]:
        trainable, mode, keep = name.split("/")
        arms.append((f"finetuned `--train {trainable} --bn-stats {mode} --keep {keep}`",
                     lambda x, n=name: x["finetuned"][n]))
    rows = []
    for label, get in arms:
        vals = [get(x) for x in runs]
        agree, acc = [v["agreement"] for v in vals], [v["val_acc"] for v in vals]
        written = ", ".join(v["written"] for v in vals if "written" in v) or "-"
        rows.append([label, f"{pct(sum(agree) / len(agree))} ({pct(min(agree))}-{pct(max(agree))})",
                     pct(sum(acc) / len(acc)), written])
    c = r["config"]
    head = (f"{machine_line(r)}\n\nTeacher: {pct(sum(x['teacher_val_acc'] for x in runs) / len(runs))} validation "
            f"accuracy (mean of {len(runs)} seeds); recovery set: {runs[0]['recovery_images']} unlabeled images"
            + (f" of classes {c['recovery_classes']}" if c.get("recovery_classes") else "")
            + f"; held-out: {runs[0]['heldout_images']} images. Defaults never below calibrate: "
            f"{r['summary']['defaults_never_below_calibrate']}.")
    return head + "\n\n" + table(["arm", "agreement with the teacher (held-out)", "val acc", "written (per seed)"],
                                   rows)


def blockwise(r: dict) -> str:
    """benchmarks/blockwise_recovery.py: each arm's accuracy after the control's budget, against the control."""
    parts = [machine_line(r)]
    for a in r["accuracy"]:
        o = a["original"]
        controls = ", ".join(f"{pct(c['val_acc'])} at lr {c['lr']:g}" for c in o.get("controls", [])) \
            or pct(o["val_acc_finetuned"])
        parts.append(f"{a['arch']} at {a['input_size']}px: original {pct(o['val_acc'])}; control (fine-tuned on "
                     f"labels, the best counts) {controls}.")
        rows = []
        for form, f in a["forms"].items():
            for name, arm in f["arms"].items():
                rows.append([form, f"`{name}`", pct(f["val_acc_converted"]), pct(arm.get("val_acc_after_refit")),
                             pct(arm["val_acc"]), f"{100 * (arm['val_acc'] - o['val_acc_finetuned']):+.2f}"])
        parts.append(table(["form", "arm", "converted", "after the refit", "after recovery", "vs control (points)"],
                           rows))
    return "\n\n".join(parts)


def search_pareto(r: dict) -> str:
    """benchmarks/search_pareto.py: searched plans at each budget and the uniform policies, timed together."""
    base = r["original"]["latency_ms"]

    def start(row: dict) -> str:  # where the global stage went on from, when starts (refit, plans) raced
        raced = row.get("start") or {}
        others = [k for k in raced.get("scores") or {} if k != raced.get("chosen")]
        return raced.get("chosen", "-") + (f" (over {', '.join(others)})" if others else "")

    rows = [["original", "-", f"- / {base:.2f} ms", "1.00x", pct(r["original"]["val_acc"]), "-", "-", "-"]]
    for s in r["searched"].values():
        probes = s.get("latency_probes") or []
        rows.append([f"searched, budget {s['budget']}", str(len(s["choice"])),
                     f"{s['predicted_ratio']:.3f} / {s['latency_ms'] / base:.3f} ({s['predicted_vs_measured']:+.1%})",
                     f"{s['speedup']:.2f}x", pct(s["val_acc"]), pct(s["agreement"]), start(s),
                     ", ".join(f"{p['measured_ratio']:.3f}" for p in probes) or "-"])
    for name, u in r["uniform"].items():
        rows.append([name, "all" if name.startswith("pf") else "-", f"- / {u['latency_ms'] / base:.3f}",
                     f"{u['speedup']:.2f}x", pct(u["val_acc"]), pct(u["agreement"]), start(u), "-"])
    parts = [machine_line(r), table(["model", "units converted", "predicted / measured latency", "speed-up",
                                     "val acc", "agreement with the original", "recovery started from",
                                     "assembled plans timed to select"], rows)]
    checks = [f"* {name}: " + ", ".join(f"{k} {v}" for k, v in c.items() if k != "uniform_compared")
              + f" (uniform policies compared: {', '.join(c['uniform_compared']) or 'none'})"
              for name, c in r.get("checks", {}).items()]
    refused = [f"* budget {b} refused: {why}" for b, why in r.get("refused", {}).items()]
    return "\n\n".join([*parts, "\n".join(checks + refused)] if checks or refused else parts)


def table_latency(r: dict) -> str:
    """benchmarks/table_latency_stability.py: the table's latency figures built several times per timing rounds."""
    rows = []
    for rounds, st in r["settings"].items():
        ratios = ", ".join(f"{b['fastest_ratio']:.3f}" for b in st["builds"])
        rows.append([rounds, f"{ratios} (sd {st['fastest_ratio']['std']:.3f})",
                     f"{st['mean_unit_saving_sd_ms']:.3f} ms", f"{st['seconds']['mean']:.1f} s"])
    return "\n\n".join([machine_line(r), table(["rounds", "fastest plan, table's ratio", "mean spread of a unit's best "
                                                  "saving", "latency phase"], rows),
                         f"The first build's fastest plan, assembled: {r['fastest_measured_ratio']:.3f} of the "
                         f"original's {r['base_ms']:.2f} ms."])


def race_curves(r: dict) -> str:
    """benchmarks/race_curves.py: each plan's hold-out score per global epoch (mean over seeds), its end accuracy
    per seed, and what each judge keeps."""
    arms = r["arms"]
    epochs = max(len(run["holdout"]) for a in arms.values() for run in a["runs"])
    rows = []
    for name, a in arms.items():
        mean = [sum(run["holdout"][e] for run in a["runs"]) / len(a["runs"]) for e in range(epochs)]
        rows.append([name, str(a["units"]), *(pct(v) for v in mean),
                     ", ".join(pct(run["end"]) for run in a["runs"]),
                     f"{pct(a['end_mean'])} ± {100 * a['end_sd']:.2f}"])
    seeds = ", ".join(str(run["seed"]) for run in next(iter(arms.values()))["runs"])
    races = [[how, ", ".join(race["kept"]), ", ".join(f"{v:.2f}" for v in race["regret_points"]),
              f"{race['mean_regret_points']:.2f}"] for how, race in r["races"].items()]
    return "\n\n".join([machine_line(r) + f" Original: {pct(r['original']['val_acc'])}; seeds {seeds}.",
                         table(["plan", "units", *(f"e{e} (mean)" for e in range(1, epochs + 1)), "end per seed (val)",
                                "end, mean ± sd"], rows),
                         table(["judged", "kept (per seed)", "regret per seed, points", "mean regret"], races)])


RENDER = {"paper_replacement_scratch": scratch, "paper_replacement_pretrained": pretrained,
          "paper_parameter_free": parameter_free, "paper_deployment": deployment,
          "torch_memory_format": memory_format, "bn_stats_recovery": bn_stats, "blockwise_recovery": blockwise,
          "search_pareto": search_pareto, "table_latency_stability": table_latency, "race_curves": race_curves}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=Path(__file__).with_name("results"))
    args = ap.parse_args()
    for name, render in RENDER.items():
        for path in sorted(args.results.glob(f"{name}*.json")):
            if path.name.endswith(".partial.json"):
                continue
            print(f"<!-- {path.name} -->\n{render(json.loads(path.read_text()))}\n")


if __name__ == "__main__":
    main()
