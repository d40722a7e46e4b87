"""Parameter-free layers (Han et al., ICLR 2022): parameters, MACs, CPU latency and accuracy after fine-tuning.

Three parts (``--parts``); the default run is ``counts latency`` (about 8-13 minutes on 2 cores) and
``accuracy`` is its own run (about 16-21 minutes), so that each command stays within 30 minutes:

* ``counts``: resnet50 vs R50-max (``--pf-policy all``) vs R50-hybrid at 224px, which must equal the paper's
  table (25.6M / 4.1G, 14.2M / 2.2G, 17.3M / 2.6G), and the same conversions of the depthwise convs of
  mobilenet_v2 and efficientnet_b0.
* ``latency``: every model above, BN folded, torch eager and ONNX Runtime (CPU, all graph optimizations) at
  batch 1 and 8, in ONE run, in blocks and rounds with paired speed-ups (``latency.py``; ONNX Runtime in fresh
  processes), so the ratios compare numbers taken under the same load.
* ``accuracy``: a small model trained from scratch on digits (default: torchvision resnet50 and mobilenet_v2
  at 32px, 10 classes), then converted and fine-tuned (every parameter, labels); the original gets the same
  extra fine-tuning as a control. Each parameter-free form is also trained from scratch (random init,
  converted, then the original's training schedule), which is the paper's setting.

    PYTHONPATH=. python benchmarks/paper_parameter_free.py [--quick] [--out FILE.json]
    PYTHONPATH=. python benchmarks/paper_parameter_free.py --parts accuracy [--out FILE.json]

``--quick`` runs all three parts, reduced (CI).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import latency
import torch
import torchvision
from paper_common import err, finish, machine, save_partial
from parameter_free_latency import export_for_bench
from rich.console import Console
from rich.table import Table

import repconv
from repconv.convert.fold import fuse_conv_bn
from repconv.onnx_graph import ort_session

FAMILIES = ("resnet50", "mobilenet_v2", "efficientnet_b0")
POLICIES = ("all", "hybrid")
PAPER = {"resnet50": (25.6, 4.1), "pf-all": (14.2, 2.2), "pf-hybrid": (17.3, 2.6)}  # params M, MACs G (224px)
console = Console(width=160)


def conversions(family: str) -> dict[str, tuple[torch.nn.Module, dict]]:
    """The torchvision model (random weights) and its parameter-free conversions, with counts at 224px."""
    torch.manual_seed(0)
    base = getattr(torchvision.models, family)().eval()
    out = {}
    for policy in POLICIES:
        conv = repconv.convert(base, arch=family, method="parameter-free", pf_policy=policy)
        s = conv.summary
        out.setdefault(family, (base, {"params": s.params_before, "macs": s.macs_before}))
        out[f"{family}/pf-{policy}"] = (conv.model.eval(), {"params": s.params_after, "macs": s.macs_after,
                                                            "steps": len(s.steps)})
    return out


def counts(models: dict) -> dict:
    rows = {}
    for name, (_, c) in models.items():
        row = dict(c)
        family, _, form = name.partition("/")
        base = models[family][1]
        row["params_ratio"], row["macs_ratio"] = row["params"] / base["params"], row["macs"] / base["macs"]
        if family == "resnet50":
            paper = PAPER[form or "resnet50"]
            row["paper_params_M"], row["paper_macs_G"] = paper
            row["matches_paper"] = (round(row["params"] / 1e6, 1), round(row["macs"] / 1e9, 1)) == paper
        rows[name] = row
    return rows


def measure_latency(models: dict, size: int, batches: list[int], threads: int, processes: int, rounds: int,
                    block: int, warmup: int) -> dict:
    """BN folded, torch eager and ONNX Runtime; speed-ups paired against the original of the same family."""
    x = torch.randn(max(batches), 3, size, size)
    rows: dict = {}
    folded_models: dict = {}
    files: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, _) in models.items():
            err.print(f"exporting {name}")
            folded, _ = fuse_conv_bn(model)
            path = export_for_bench(model, Path(tmp) / f"{name.replace('/', '_')}.onnx", True, size,
                                    name.partition("/")[0])
            with torch.no_grad():
                ref = model(x[:2])
            out = ort_session(path, "all", threads=threads, spinning="on").run(None, {"input": x[:2].numpy()})[0]
            rows[name] = {"fold_max_abs_diff": float((folded(x[:2]) - ref).abs().max()),
                          "onnx_max_abs_diff": float(abs(out - ref.numpy()).max())}
            folded_models[name], files[name] = folded, (path, "all")
        timing = {"rounds": rounds, "block": block, "warmup": warmup}
        inputs = {b: x[:b].contiguous() for b in batches}
        for family in dict.fromkeys(n.partition("/")[0] for n in models):
            members = [n for n in models if n.partition("/")[0] == family]
            err.print(f"timing {family} ({len(members)} models) in torch eager and ONNX Runtime")
            per_runtime = {"torch": latency.torch_latency({n: folded_models[n] for n in members}, inputs, **timing),
                           "ort": latency.ort_latency({n: files[n] for n in members}, batches, size, threads=threads,
                                                      processes=processes, **timing)}
            for rt, per_batch in per_runtime.items():
                for b, table in per_batch.items():
                    for name, r in table.items():
                        rows[name][f"{rt}_{b}_ms"] = r["median_ms"]
                        rows[name][f"{rt}_{b}_speedup"] = r["speedup"]
    return rows


def accuracy(arch: str, size: int, pretrain_epochs: int, finetune_epochs: int, batches_per_epoch: int | None,
             batch_size: int, lr: float, out: dict, on_progress=lambda: None) -> dict:
    """Train ``arch`` on digits, then fine-tune it and each parameter-free conversion for the same epochs.

    Fills ``out`` as it goes (the caller writes it as a partial result)."""
    out |= {"arch": arch, "input_size": size}
    with tempfile.TemporaryDirectory() as tmp:
        original = Path(tmp) / "original.safetensors"
        err.print(f"training {arch} on digits at {size}px for {pretrain_epochs} epochs")
        res = repconv.train(arch, data="digits", output=original, replace=False, epochs=pretrain_epochs,
                            batch_size=batch_size, batches_per_epoch=batches_per_epoch, input_size=size)
        out["original"] = {"val_acc": res.val_acc, "params": res.params}
        on_progress()
        forms = {"original": original}
        scratch = _random_init(original, Path(tmp) / "random.safetensors")
        for policy in POLICIES:
            conv = repconv.convert(original, method="parameter-free", pf_policy=policy,
                                   output=Path(tmp) / f"pf-{policy}.safetensors")
            forms[f"pf-{policy}"] = conv.output
            out[f"pf-{policy}"] = {"params": conv.summary.params_after,
                                   "val_acc_converted": _val_acc(conv.model, size)}
            err.print(f"training {arch} pf-{policy} from scratch for {pretrain_epochs} epochs")
            fresh = repconv.convert(scratch, method="parameter-free", pf_policy=policy,
                                    output=Path(tmp) / f"pf-{policy}-random.safetensors")
            res = repconv.finetune(fresh.output, data="digits", output=Path(tmp) / f"pf-{policy}-scratch.safetensors",
                                   train="all", objective="ce", epochs=pretrain_epochs, **TRAIN_SCHEDULE,
                                   batch_size=batch_size, batches_per_epoch=batches_per_epoch)
            out[f"pf-{policy}"]["val_acc_scratch"] = res.val_acc
            on_progress()
        for form, path in forms.items():
            err.print(f"fine-tuning {arch} {form} for {finetune_epochs} epochs")
            ft = repconv.finetune(path, data="digits", output=Path(tmp) / f"{form}-ft.safetensors", train="all",
                                  objective="ce", epochs=finetune_epochs, lr=lr, optimizer="adamw",
                                  batch_size=batch_size, batches_per_epoch=batches_per_epoch)
            out[form]["val_acc_finetuned"] = ft.val_acc
            on_progress()
    return out


# repconv.train's defaults, so a form trained from scratch gets the same schedule as the original
TRAIN_SCHEDULE = {"lr": 0.1, "optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4, "warmup_epochs": 1.0}


def _random_init(trained: Path, output: Path) -> Path:
    """A freshly initialised model of the same architecture and metadata as ``trained`` (seed 0)."""
    from repconv.checkpoint import save
    from repconv.models import resolve_arch

    meta = repconv.load_checkpoint(trained).meta
    torch.manual_seed(0)
    return save(output, resolve_arch(meta.arch).build(**meta.arch_kwargs), meta)


def _val_acc(model: torch.nn.Module, size: int) -> float:
    from repconv.data import digits
    from repconv.train.loop import evaluate

    return evaluate(model, digits("val", size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))


def render(result: dict) -> None:
    if "counts" in result:
        t = Table(title="parameters and MACs at 224px (paper: R50 25.6M/4.1G, max 14.2M/2.2G, hybrid 17.3M/2.6G)",
                  title_justify="left")
        for col in ("model", "params", "MACs", "params ratio", "MACs ratio", "= paper"):
            t.add_column(col, justify="left" if col == "model" else "right")
        for name, r in result["counts"].items():
            t.add_row(name, f"{r['params'] / 1e6:.2f}M", f"{r['macs'] / 1e9:.3f}G", f"{r['params_ratio']:.2f}",
                      f"{r['macs_ratio']:.2f}", {True: "yes", False: "NO"}.get(r.get("matches_paper"), "-"))
        console.print(t)
    if "latency" in result:
        c = result["config"]
        t = Table(title=f"CPU latency, median ms ({c['threads']} threads, {c['size']}px; speed-up vs the original "
                        "of the same family)", title_justify="left")
        keys = [k for k in next(iter(result["latency"].values())) if k.endswith("_ms")]
        t.add_column("model")
        for k in keys:
            t.add_column(k.removesuffix("_ms").replace("_", " "), justify="right")
        for name, r in result["latency"].items():
            t.add_row(name, *(f"{r[k]:.1f} ({r[k.replace('_ms', '_speedup')]:.2f}x)" for k in keys))
        console.print(t)
    for acc in result.get("accuracy", []):
        t = Table(title=f"{acc['arch']} on digits at {acc['input_size']}px: validation accuracy", title_justify="left")
        for col in ("form", "params", "trained from scratch", "after conversion", "after fine-tuning"):
            t.add_column(col, justify="left" if col == "form" else "right")
        for form in ("original", *(f"pf-{p}" for p in POLICIES)):
            r = acc[form]
            t.add_row(form, f"{r['params']:,}", f"{r.get('val_acc_scratch', r.get('val_acc')):.2%}",
                      f"{r.get('val_acc_converted', r.get('val_acc')):.2%}", f"{r['val_acc_finetuned']:.2%}")
        console.print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["counts", "latency"], choices=["counts", "latency", "accuracy"])
    ap.add_argument("--families", nargs="+", default=list(FAMILIES))
    ap.add_argument("--size", type=int, default=224, help="latency input size")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--processes", type=int, default=3, help="fresh ONNX Runtime processes")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--block", type=int, default=5, help="timed runs per block")
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs before each block")
    ap.add_argument("--acc-archs", nargs="+", default=["resnet50", "mobilenet_v2"])
    ap.add_argument("--acc-size", type=int, default=32)
    ap.add_argument("--pretrain-epochs", type=int, default=10, help="also the epochs of the from-scratch runs")
    ap.add_argument("--finetune-epochs", type=int, default=10)
    ap.add_argument("--finetune-lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches-per-epoch", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="resnet50 + mobilenet_v2 counts, latency at 64px with 2 "
                    "rounds, mobilenet_v2 accuracy with 2 batches per epoch")
    ap.add_argument("--out", type=Path, default=Path("paper_parameter_free.json"))
    args = ap.parse_args()
    if args.quick:
        args.parts = ["counts", "latency", "accuracy"]
        args.families, args.size = ["resnet50", "mobilenet_v2"], 64
        args.processes, args.rounds, args.block, args.warmup = 1, 2, 2, 1
        args.acc_archs, args.pretrain_epochs, args.finetune_epochs = ["mobilenet_v2"], 1, 1
        args.batch_size, args.batches_per_epoch = 16, 2
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result: dict = {"config": {k: v for k, v in vars(args).items() if k != "out"}, "machine": machine(args.threads)}
    needs_models = {"counts", "latency"} & set(args.parts)
    models = {k: v for f in args.families for k, v in conversions(f).items()} if needs_models else {}
    if "counts" in args.parts:
        result["counts"] = counts(models)
    if "latency" in args.parts:
        result["latency"] = measure_latency(models, args.size, args.batches, args.threads, args.processes,
                                            args.rounds, args.block, args.warmup)
    if "accuracy" in args.parts:
        result["accuracy"] = []
        for arch in args.acc_archs:
            result["accuracy"].append({})
            accuracy(arch, args.acc_size, args.pretrain_epochs, args.finetune_epochs, args.batches_per_epoch,
                     args.batch_size, args.finetune_lr, result["accuracy"][-1],
                     lambda: save_partial(result, args.out))
    render(result)
    finish(result, args.out, started)


if __name__ == "__main__":
    main()
