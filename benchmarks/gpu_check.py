"""The GPU check: repconv's CUDA paths in one run, each part capped in time, results as JSON + markdown.

    bash benchmarks/gpu_check.sh [--out DIR] [--parts a,b] [--budget-s 420]     # on the GPU machine
    PYTHONPATH=. python benchmarks/gpu_check.py --device cpu --quick --out DIR   # the CPU dry run (CI)

Parts (each independent: one failing does not stop the others; each records its config, the machine and
its checks, every check ``ok`` / ``failed`` (with the error) / ``skipped`` (with the reason)):

1. ``correctness_digits``, ``correctness_resnet50``: the same original model goes through convert (every 2nd
   interior unit), calibrate (LBFGS on 4 batches), fine-tune (scalars, a few hundred steps through
   ``repconv.train.loop.fit``) and fold, on CUDA with bf16 autocast, on CUDA in fp32, and on the CPU (a
   fresh process that sees no GPU); the runs are compared within the tolerances in ``TOLERANCES``.
   ``cli``: ``repconv predict`` and ``repconv bench`` with ``--device cuda`` (ONNX Runtime's CUDA provider
   and TensorRT too, when importable).
2. ``latency_parameter_free``: resnet50 vs R50-max and R50-hybrid (``pf_resnet50_max`` / ``_hybrid``), batch
   1 / 64 / 256, fp16 and bf16 weights, channels_last, eager and CUDA graphs (``--compile`` adds
   torch.compile); blocks timed in interleaved rounds, speed-ups paired within a round.
3. ``training_cost``: end-to-end vs replace-every-2 (cifar_resnet56, batch 128, SGD; ViT-B/16 at 224px,
   batch 32, AdamW), bf16 autocast: exact peak memory (``torch.cuda.max_memory_allocated``, reset per arm),
   step time, and where the bytes go (parameters, gradients, optimizer state, tensors saved for backward);
   a third arm runs the replaced units' synthesis through plain autograd instead of ``Synthesis``.
4. ``ddp``: ``repconv.train.loop.fit`` and an explicit DistributedDataParallel loop under ``torchrun``
   (world size 1, NCCL) against the same runs without a process group.
5. ``search``: ``repconv search`` of a cifar_resnet20 on digits (layer3's units, a few batches a stage) with
   ``--device cuda``: the candidate table, the refit and its race on the GPU, latency on the ``torch-nchw``
   target on the GPU, then ``ort-cuda`` and ``tensorrt`` targets where ONNX Runtime has their providers; the
   searched checkpoint must load on the CPU, fold within 1e-5 and export verified ONNX. The CPU dry run does the
   same on the CPU.

Uses no network and imports only what the machine has: parts that need a missing package are skipped
with the reason. ``--device cpu --quick`` runs every CPU-runnable piece at toy scale (under 90 s on
2 cores) and marks the CUDA-only checks skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.util
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere, installed or not
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

SCHEMA = "repconv-gpu-check/1"
PARTS = ("correctness_digits", "correctness_resnet50", "cli", "latency_parameter_free", "training_cost", "ddp",
         "search")
CAPS_S = {"correctness_digits": 50, "correctness_resnet50": 110, "cli": 50, "latency_parameter_free": 90,
          "training_cost": 80, "ddp": 50, "search": 90}  # full run; each part is also capped by what --budget-s leaves
QUICK_CAPS_S = dict.fromkeys(PARTS, 90)  # toy work (a few seconds each on 2 quiet cores); generous for busy CI
TOLERANCES = {  # CUDA run vs CPU run of the same pipeline from the same original weights and data order
    "converted_logits_max_rel": 1e-2,  # before training, eval, fp32 (cuDNN may use TF32 convolutions)
    "calibrated_scalars_max_abs": 0.05,  # LBFGS from the same start on the same batches
    "fp32": {"scalars_max_abs": 0.02, "train_loss_rel": 0.05, "folded_logits_max_rel": 0.02, "top1_agreement": 0.98},
    "bf16": {"scalars_max_abs": 0.05, "train_loss_rel": 0.10, "folded_logits_max_rel": 0.10, "top1_agreement": 0.90},
    "fold_parity_max_rel": 1e-5,  # folded vs converted on the same device, eval (repconv fold's own tolerance)
    "ddp_params_max_abs": 1e-5,  # world size 1 vs no process group
}
PAPER = {"pf_resnet50_max": {"ms": 6.8, "speedup": 1.28}, "pf_resnet50_hybrid": {"ms": 7.3, "speedup": 1.19},
         "resnet50": {"ms": 8.7}}
CUDA_ONLY = "needs a CUDA GPU (torch.cuda.is_available() is False here)"


# ---------------------------------------------------------------- bookkeeping


class PartTimeout(Exception):
    pass


def has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing(*modules: str) -> list[str]:
    return [m for m in modules if not has(m)]


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def machine() -> dict:
    info = {"utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "python": platform.python_version(),
            "torch": torch.__version__, "cuda_runtime": torch.version.cuda, "cudnn": None,
            "cuda_available": torch.cuda.is_available(), "gpu": None, "gpu_count": 0, "driver": None,
            "cpu_count": os.cpu_count(), "loadavg_1m": loadavg(), "platform": platform.platform(),
            "packages": {m: has(m) for m in ("torchvision", "numpy", "onnx", "onnxruntime", "tensorrt", "timm",
                                             "sklearn", "rich", "typer", "safetensors", "PIL")}}
    with contextlib.suppress(Exception):
        import torchvision

        info["torchvision"] = torchvision.__version__
    with contextlib.suppress(Exception):
        from repconv.runtime.measure import cpu_model

        info["cpu"] = cpu_model()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version(),
                    tf32_conv=torch.backends.cudnn.allow_tf32, tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
        with contextlib.suppress(Exception):
            done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=10)
            info["driver"] = done.stdout.strip().splitlines()[0] if done.returncode == 0 else None
    return info


def check(status: str, reason: str | None = None, **values) -> dict:
    return {"status": status, "reason": reason, **values}


def skipped(reason: str, **values) -> dict:
    return check("skipped", reason, **values)


def within(ok: bool, values: dict, what: str) -> dict:
    return check("ok" if ok else "failed", None if ok else f"outside tolerance: {what}", **values)


def finite_or_none(x):
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def part_status(checks: dict) -> tuple[str, str | None]:
    states = [c["status"] for c in checks.values()]
    if "failed" in states:
        return "failed", "; ".join(f"{k}: {c['reason']}" for k, c in checks.items() if c["status"] == "failed")
    if "ok" in states:
        return "ok", None
    reasons = sorted({c["reason"] for c in checks.values() if c.get("reason")})
    return "skipped", "; ".join(reasons) or "nothing to run"


@contextlib.contextmanager
def time_cap(seconds: float):
    """Raise PartTimeout in the main thread after ``seconds`` (between Python bytecodes, so also inside a
    training loop); nested caps keep the outer one running. Parts also check a Deadline between steps."""
    def fire(signum, frame):
        raise PartTimeout(f"exceeded its time cap of {seconds:.0f} s")

    started = time.monotonic()
    outer_left = signal.getitimer(signal.ITIMER_REAL)[0]
    seconds = min(seconds, outer_left) if outer_left > 0 else seconds
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if outer_left > 0:
            signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - started), 0.01))


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def near(self, margin: float = 0.0) -> bool:
        return self.left() <= margin


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def start_json(cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, cwd=ROOT)


def finish_json(proc: subprocess.Popen, timeout: float) -> dict:
    """Wait for a started command; its stdout is JSON (or its last line is). Timeouts and crashes become
    exceptions with stderr's tail; the process is killed on any way out."""
    try:
        stdout, stderr = proc.communicate(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired as exc:
        raise PartTimeout(f"{' '.join(str(a) for a in proc.args[1:3])} ran past {timeout:.0f} s") from exc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"exit {proc.returncode}: {stderr.strip()[-1500:]}")
    text = stdout.strip()
    with contextlib.suppress(json.JSONDecodeError):
        return json.loads(text)  # an indented JSON document (the CLI's --json)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise RuntimeError(f"no output; stderr: {stderr.strip()[-1500:]}")
    return json.loads(lines[-1])  # a worker's last line


def subprocess_json(cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    return finish_json(start_json(cmd, env), timeout)


def worker_cmd(name: str, payload: dict) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--payload", json.dumps(payload)]


# ---------------------------------------------------------------- models and data (repconv's low-level modules)


def convert_every(model: nn.Module, every: int = 2, arch: str | None = None) -> nn.Module:
    """``repconv.convert(model, every=every)`` done with the stable low-level modules: the public API imports
    onnx at module load, which the GPU machine may not have."""
    from repconv.convert.apply import apply_plan
    from repconv.convert.graph import count_params, find_runs, trace
    from repconv.convert.plan import Plan
    from repconv.convert.replacement import select_units

    steps = select_units(find_runs(model), every=every, total_params=count_params(model))
    gm = trace(copy.deepcopy(model))
    apply_plan(gm, Plan(steps, arch, []), model_for_init=model)
    return gm


def build(arch: str, **kwargs) -> nn.Module:
    from repconv.models import resolve_arch

    return resolve_arch(arch).build(**kwargs)


def dataset(split: str, size: int, n_fallback: int):
    """Digits (scikit-learn's, bundled with it) at ``size`` px; without scikit-learn, seeded noise images with
    seeded labels (a stated stand-in: the comparisons need identical inputs, not meaningful ones)."""
    if has("sklearn"):
        from repconv.data import digits

        return digits(split, size=size), "digits (scikit-learn)"
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    x = torch.randn(n_fallback, 3, size, size, generator=g)
    y = torch.randint(0, 10, (n_fallback,), generator=g)
    return torch.utils.data.TensorDataset(x, y), "seeded noise images (scikit-learn missing)"


def train_plain(model: nn.Module, ds, batch: int, batches: int, lr: float = 0.05) -> None:
    """A short plain SGD run on the CPU (the digits original; deterministic, no repconv code involved)."""
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True,
                                         generator=torch.Generator().manual_seed(0), drop_last=True)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    done = 0
    while done < batches:
        for x, y in loader:
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            done += 1
            if done >= batches:
                break
    model.eval()


# ---------------------------------------------------------------- part 1: the pipeline on one device


PIPELINES = {  # full / quick configurations
    "digits": {"arch": "cifar_resnet20", "num_classes": 10, "size": 32, "batch": 64, "epochs": 9, "lr": 2e-3,
               "objective": "both", "original_batches": 66, "calib_batches": 4, "calib_iter": 20},
    "resnet50": {"arch": "resnet50", "num_classes": 1000, "size": 64, "batch": 16, "epochs": 2, "lr": 2e-3,
                 "objective": "distill", "original_batches": 0, "calib_batches": 4, "calib_iter": 20},
}
QUICK_PIPELINES = {
    "digits": {"size": 32, "batch": 8, "epochs": 1, "batches_per_epoch": 3, "original_batches": 3,
               "calib_batches": 1, "calib_iter": 2},
    "resnet50": {"size": 32, "batch": 2, "epochs": 1, "batches_per_epoch": 2, "calib_batches": 1, "calib_iter": 1},
}


def pipeline_config(name: str, quick: bool) -> dict:
    cfg = dict(PIPELINES[name])
    if quick:
        cfg.update(QUICK_PIPELINES[name])
    return cfg


def prepare_original(name: str, cfg: dict, folder: Path) -> Path:
    """The original model every device starts from (seeded; the digits one trained briefly on the CPU)."""
    torch.manual_seed(0)
    model = build(cfg["arch"], num_classes=cfg["num_classes"]).eval()
    if cfg["original_batches"]:
        ds, _ = dataset("train", cfg["size"], 512)
        train_plain(model, ds, cfg["batch"], cfg["original_batches"])
    path = folder / f"{name}.original.pt"
    torch.save(model.state_dict(), path)
    return path


def run_pipeline(payload: dict) -> dict:
    """convert -> calibrate -> fine-tune -> fold on the device this process sees (fit picks CUDA when it can)."""
    from repconv.convert.fold import folded_state_dict
    from repconv.convert.replacement import replaced_units
    from repconv.train.calibrate import calibrate_units
    from repconv.train.loop import TrainConfig, evaluate, fit

    cfg, amp, folder = payload["cfg"], payload["amp"], Path(payload["folder"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    original = build(cfg["arch"], num_classes=cfg["num_classes"])
    original.load_state_dict(torch.load(payload["original"], map_location="cpu", weights_only=True))
    original.eval()
    train_set, data = dataset("train", cfg["size"], 512)
    val_set, _ = dataset("val", cfg["size"], 128)
    check_x = torch.stack([val_set[i][0] for i in range(min(32, len(val_set)))])
    converted = convert_every(original, 2, cfg["arch"])
    units = list(replaced_units(converted))
    with torch.no_grad():
        converted_logits = converted.to(device).eval()(check_x.to(device)).float().cpu()
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg["batch"], shuffle=True,
                                         generator=torch.Generator().manual_seed(1))
    calib = [x.to(device) for _, (x, _) in zip(range(cfg["calib_batches"]), loader, strict=False)]
    t_cal = time.perf_counter()
    cal = calibrate_units(converted, original.to(device), calib, cfg["calib_iter"])
    calib_s = time.perf_counter() - t_cal
    calibrated = {u.unit: [u.a, u.b] for u in cal.units}
    tcfg = TrainConfig(epochs=cfg["epochs"], batch_size=cfg["batch"], lr=cfg["lr"], optimizer="adamw",
                       objective=cfg["objective"], trainable="scalars", amp=amp, seed=0,
                       batches_per_epoch=cfg.get("batches_per_epoch"))
    t_fit = time.perf_counter()
    res = fit(converted, train_set, tcfg, teacher=original if cfg["objective"] != "ce" else None)
    fit_s = time.perf_counter() - t_fit
    steps = sum(math.ceil(h["images"] / cfg["batch"]) for h in res.history)
    converted.to(device).eval()
    folded = build(cfg["arch"], num_classes=cfg["num_classes"])
    folded.load_state_dict(folded_state_dict(converted))  # strict: the original architecture again
    folded.to(device).eval()
    with torch.no_grad():
        xs = check_x.to(device)
        a, b = converted(xs).float(), folded(xs).float()
        parity = float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))
        folded_logits = b.cpu()
    scalars = {u: [float(s.a.detach()), float(s.b.detach())] for u, s in replaced_units(converted).items()}
    val_acc = evaluate(folded, val_set, device=device) if cfg["num_classes"] == 10 else None
    tag = f"{payload['name']}.{device}.{amp}"
    torch.save({"converted_logits": converted_logits, "folded_logits": folded_logits,
                "folded_state": {k: v.cpu() for k, v in folded.state_dict().items()}}, folder / f"{tag}.pt")
    return {"device": device, "amp": res.amp, "data": data, "replaced_units": units, "steps": steps,
            "kl_before": cal.kl_before, "kl_after": cal.kl_after, "calibrated_scalars": calibrated,
            "scalars": scalars, "train_loss": res.train_loss, "val_acc": val_acc, "fold_parity_max_rel": parity,
            "calibrate_s": round(calib_s, 2), "finetune_s": round(fit_s, 2),
            "finetune_steps_per_s": round(steps / max(fit_s, 1e-9), 1), "wall_s": round(time.perf_counter() - t0, 2),
            "tensors": f"{tag}.pt"}


def pipeline_payload(name: str, cfg: dict, amp: str, original: Path, folder: Path) -> dict:
    return {"name": name, "cfg": cfg, "amp": amp, "original": str(original), "folder": str(folder)}


def start_cpu_reference(payload: dict) -> subprocess.Popen:
    """The CPU run on a machine with a GPU: a process that sees no GPU (fit would pick CUDA), started before the
    CUDA runs so that both go at once; it leaves two cores to the process driving the GPU."""
    threads = str(max(1, (os.cpu_count() or 2) - 2))
    return start_json(worker_cmd("pipeline", payload), {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": threads})


def compare_runs(ref: dict, run: dict, folder: Path, tol: dict) -> dict:
    r_t, c_t = torch.load(folder / ref["tensors"]), torch.load(folder / run["tensors"])

    def max_rel(a, b):
        return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))

    conv_rel = max_rel(r_t["converted_logits"], c_t["converted_logits"])
    cal = max(abs(x - y) for u in ref["calibrated_scalars"]
              for x, y in zip(ref["calibrated_scalars"][u], run["calibrated_scalars"][u], strict=True))
    sc = max(abs(x - y) for u in ref["scalars"] for x, y in zip(ref["scalars"][u], run["scalars"][u], strict=True))
    loss_rel = abs(run["train_loss"] - ref["train_loss"]) / max(abs(ref["train_loss"]), 1e-12)
    fold_rel = max_rel(r_t["folded_logits"], c_t["folded_logits"])
    agree = float((r_t["folded_logits"].argmax(1) == c_t["folded_logits"].argmax(1)).float().mean())
    values = {"converted_logits_max_rel": conv_rel, "calibrated_scalars_max_abs": cal, "scalars_max_abs": sc,
              "train_loss_rel": loss_rel, "folded_logits_max_rel": fold_rel, "top1_agreement": agree,
              "val_acc_diff": None if ref["val_acc"] is None else run["val_acc"] - ref["val_acc"]}
    fails = [k for k, limit in (("converted_logits_max_rel", TOLERANCES["converted_logits_max_rel"]),
                                ("calibrated_scalars_max_abs", TOLERANCES["calibrated_scalars_max_abs"]),
                                ("scalars_max_abs", tol["scalars_max_abs"]), ("train_loss_rel", tol["train_loss_rel"]),
                                ("folded_logits_max_rel", tol["folded_logits_max_rel"])) if values[k] > limit]
    if agree < tol["top1_agreement"]:
        fails.append("top1_agreement")
    return check("ok" if not fails else "failed", f"outside tolerance: {', '.join(fails)}" if fails else None,
                 **values, tolerances=tol)


def part_correctness(name: str, args, deadline: Deadline) -> dict:
    cfg = pipeline_config(name, args.quick)
    config = {"pipeline": cfg, "tolerances": TOLERANCES, "reference": "the same pipeline on the CPU in fp32",
              "note": "fine-tuning: repconv.train.loop.fit, scalars only, AdamW; CUDA runs bf16 autocast and fp32"}
    checks: dict = {}
    cuda = args.device == "cuda"
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        folder = Path(tmp)
        original = prepare_original(name, cfg, folder)
        runs = {}
        # the CPU run goes to a process that sees no GPU whenever this one sees one (fit would pick CUDA),
        # started first so that it runs while this process drives the GPU
        reference = (start_cpu_reference(pipeline_payload(name, cfg, "off", original, folder))
                     if torch.cuda.is_available() else None)
        plan = [("cuda", "on"), ("cuda", "off"), ("cpu", "off")] if cuda else [("cpu", "off")]
        try:
            for device, amp in plan:
                key = f"pipeline_{device}" + ("_bf16" if amp == "on" else "_fp32")
                try:
                    if device == "cpu" and reference is not None:
                        runs[key] = finish_json(reference, deadline.left())
                    elif deadline.near(5):
                        checks[key] = skipped("part time cap reached before this run")
                        continue
                    else:  # in this process: fit picks the device by itself
                        with time_cap(deadline.left()):
                            runs[key] = run_pipeline(pipeline_payload(name, cfg, amp, original, folder))
                    ok = runs[key]["fold_parity_max_rel"] <= TOLERANCES["fold_parity_max_rel"]
                    checks[key] = within(ok, {k: v for k, v in runs[key].items() if k != "tensors"},
                                         f"fold parity {runs[key]['fold_parity_max_rel']:.3g}")
                except Exception as exc:  # a part reports every error it meets
                    checks[key] = check("failed", f"{type(exc).__name__}: {exc}")
        finally:
            if reference is not None and reference.poll() is None:
                reference.kill()
                reference.communicate()
        if not cuda:
            for key in ("pipeline_cuda_bf16", "pipeline_cuda_fp32", "cuda_bf16_vs_cpu", "cuda_fp32_vs_cpu"):
                checks[key] = skipped(CUDA_ONLY, cuda_only=True)
        else:
            for prec in ("bf16", "fp32"):
                key, ref = f"pipeline_cuda_{prec}", "pipeline_cpu_fp32"
                if key in runs and ref in runs:
                    try:
                        checks[f"cuda_{prec}_vs_cpu"] = compare_runs(runs[ref], runs[key], folder, TOLERANCES[prec])
                    except Exception as exc:
                        checks[f"cuda_{prec}_vs_cpu"] = check("failed", f"{type(exc).__name__}: {exc}")
                else:
                    checks[f"cuda_{prec}_vs_cpu"] = skipped("a run it compares did not finish")
    return {"config": config, "checks": checks}


# ---------------------------------------------------------------- part 1b: the CLI on CUDA


def part_cli(args, deadline: Deadline) -> dict:
    need = missing("typer", "rich", "onnx", "safetensors", "PIL", "numpy")
    config = {"commands": ["python -m repconv predict FILE IMAGES --device D --json",
                           "python -m repconv bench FILE --device D --batch 1,8 --repeats 10 --json"]}
    devices = ["cuda"] if args.device == "cuda" else ["cpu"]
    checks: dict = {}
    if need:
        reason = f"the CLI needs {', '.join(need)}, which this Python cannot import"
        return {"config": config, "checks": {f"{c}_{d}": skipped(reason) for c in ("predict", "bench")
                                             for d in ("cpu", "cuda")}}
    import numpy as np
    from PIL import Image

    from repconv.checkpoint import CheckpointMeta, save
    from repconv.models import resolve_arch

    with tempfile.TemporaryDirectory(prefix="gpu-check-cli-") as tmp:
        folder = Path(tmp)
        torch.manual_seed(0)
        ckpt = folder / "model.repconv.safetensors"
        save(ckpt, build("cifar_resnet20").eval(), CheckpointMeta.for_arch(resolve_arch("cifar_resnet20")))
        rng = np.random.default_rng(0)
        images = []
        for i in range(3):
            path = folder / f"img{i}.png"
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
            images.append(str(path))
        cli = [sys.executable, "-m", "repconv"]
        for device in devices:
            for what, cmd in (("predict", [*cli, "predict", str(ckpt), *images, "--device", device, "--json"]),
                              ("bench", [*cli, "bench", str(ckpt), "--device", device, "--batch", "1,8",
                                         "--repeats", "10", "--warmup", "2", "--json"])):
                key = f"{what}_{device}"
                try:
                    out = subprocess_json(cmd, deadline.left())
                    if what == "predict":
                        preds = out.get("predictions", [])
                        ok = len(preds) == 3 and out.get("device") == device
                        checks[key] = within(ok, {"device": out.get("device"), "backend": out.get("backend"),
                                                  "images": len(preds)}, "wrong device or predictions")
                    else:
                        (target,) = out["targets"]
                        ms = {t["batch"]: t["median_ms"] for t in target["timings"]}
                        checks[key] = within(target["device"] == device and all(v > 0 for v in ms.values()),
                                             {"device": target["device"], "median_ms": ms,
                                              "cuda_peak_bytes": target.get("cuda_peak_bytes")}, "no timings")
                except Exception as exc:
                    checks[key] = check("failed", f"{type(exc).__name__}: {exc}")
        if args.device != "cuda":
            checks["predict_cuda"] = skipped(CUDA_ONLY, cuda_only=True)
            checks["bench_cuda"] = skipped(CUDA_ONLY, cuda_only=True)
        checks["bench_ort_cuda"] = _ort_cuda(args, ckpt, cli, deadline)
        checks["bench_tensorrt"] = _tensorrt(args, ckpt, cli, deadline)
    return {"config": config, "checks": checks}


def _ort_cuda(args, ckpt: Path, cli: list[str], deadline: Deadline) -> dict:
    if args.device != "cuda":
        return skipped(CUDA_ONLY, cuda_only=True)
    if not has("onnxruntime"):
        return skipped("onnxruntime is not installed (onnxruntime-gpu is too large to carry to this machine)")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return skipped(f"onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider (not onnxruntime-gpu)")
    try:
        out = subprocess_json([*cli, "bench", str(ckpt), "--backend", "ort", "--device", "cuda", "--batch", "1,8",
                               "--repeats", "10", "--json"], deadline.left())
        return check("ok", None, median_ms={t["batch"]: t["median_ms"] for t in out["targets"][0]["timings"]})
    except Exception as exc:
        return check("failed", f"{type(exc).__name__}: {exc}")


def _tensorrt(args, ckpt: Path, cli: list[str], deadline: Deadline) -> dict:
    if args.device != "cuda":
        return skipped(CUDA_ONLY, cuda_only=True)
    if not has("tensorrt"):
        return skipped("TensorRT is not installed (too large to carry to this machine)")
    try:
        out = subprocess_json([*cli, "bench", str(ckpt), "--backend", "trt", "--batch", "1,8", "--repeats", "10",
                               "--json"], deadline.left())
        return check("ok", None, median_ms={t["batch"]: t["median_ms"] for t in out["targets"][0]["timings"]})
    except Exception as exc:
        return check("failed", f"{type(exc).__name__}: {exc}")


# ---------------------------------------------------------------- part 2: parameter-free latency


LATENCY_MODELS = ("resnet50", "pf_resnet50_max", "pf_resnet50_hybrid")


def _timer(device: str):
    if device == "cuda":
        def timed(fn: Callable, n: int) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / n
    else:
        def timed(fn: Callable, n: int) -> float:
            t = time.perf_counter()
            for _ in range(n):
                fn()
            return (time.perf_counter() - t) * 1e3 / n
    return timed


def _runner(model: nn.Module, x: torch.Tensor, mode: str) -> Callable:
    if mode == "eager":
        return lambda: model(x)
    if mode == "compile":
        compiled = torch.compile(model)
        return lambda: compiled(x)
    # CUDA graph: static input, warm-up on a side stream, one capture, replays
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            model(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(x)
    return graph.replay


def part_latency(args, deadline: Deadline) -> dict:
    cuda = args.device == "cuda"
    device = args.device
    size = 224 if not args.quick else 32
    batches = (1, 64, 256) if not args.quick else (1, 2)
    dtypes = ("fp16", "bf16") if cuda else ("fp32",)
    modes = ("eager", "cudagraph") + (("compile",) if args.compile else ()) if cuda else ("eager",)
    rounds = 7 if not args.quick else 2
    config = {"models": list(LATENCY_MODELS), "size": size, "batches": list(batches), "dtypes": list(dtypes),
              "modes": list(modes), "memory_format": "channels_last", "rounds": rounds, "weights": "random (seeded)",
              "timing": "per round, each model runs a block of n calls (n sized to ~25 ms); the speed-up is the "
                        "median over rounds of resnet50's block / the model's block (paired)",
              "paper": PAPER}
    checks: dict = {}
    torch.manual_seed(0)
    if cuda:
        torch.backends.cudnn.benchmark = True
    models = {m: build(m).eval().to(device, memory_format=torch.channels_last) for m in LATENCY_MODELS}
    timed = _timer(device)
    table = {}
    for dt in dtypes:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dt]
        cast = {m: copy.deepcopy(net).to(dtype) if dtype != torch.float32 else net for m, net in models.items()}
        for batch in batches:
            for mode in modes:
                key = f"{dt}_b{batch}_{mode}"
                if deadline.near(8):
                    checks[key] = skipped("part time cap reached before this configuration")
                    continue
                try:
                    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype).contiguous(
                        memory_format=torch.channels_last)
                    with torch.inference_mode():
                        fns = {m: _runner(net, x, mode) for m, net in cast.items()}
                        for fn in fns.values():
                            fn()
                        sync(device)
                        n = {m: max(2, min(50, math.ceil(25 / max(timed(fn, 1), 1e-3)))) for m, fn in fns.items()}
                        ms = {m: [] for m in fns}
                        for _ in range(rounds):
                            for m, fn in fns.items():
                                ms[m].append(timed(fn, n[m]))
                    row = {}
                    for m, values in ms.items():
                        pairs = [b / v for b, v in zip(ms["resnet50"], values, strict=True)]
                        row[m] = {"median_ms": statistics.median(values), "images_per_s": batch * 1e3 /
                                  statistics.median(values), "speedup": statistics.median(pairs),
                                  "speedup_min": min(pairs), "speedup_max": max(pairs), "calls_per_block": n[m]}
                    table[key] = row
                    checks[key] = check("ok", None, **{m: round(r["median_ms"], 4) for m, r in row.items()})
                    del fns
                except Exception as exc:
                    checks[key] = check("failed", f"{type(exc).__name__}: {str(exc)[:500]}")
                if cuda:
                    torch.cuda.empty_cache()
    if not cuda:
        checks["fp16_bf16"] = skipped(CUDA_ONLY + "; half-precision inference is timed on the GPU only", cuda_only=True)
        checks["cudagraph"] = skipped(CUDA_ONLY, cuda_only=True)
    fastest = {}
    for dt in dtypes:
        for batch in batches:
            done = {mode: table[f"{dt}_b{batch}_{mode}"] for mode in modes if f"{dt}_b{batch}_{mode}" in table}
            if done:
                best = min(done, key=lambda mode, d=done: d[mode]["resnet50"]["median_ms"])
                fastest[f"{dt}_b{batch}"] = {"mode": best, **{m: {"median_ms": r["median_ms"], "speedup": r["speedup"]}
                                                              for m, r in done[best].items()}}
    return {"config": config, "checks": checks, "results": {"table": table, "fastest": fastest}}


# ---------------------------------------------------------------- part 3: Replacement Learning training cost


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _saved_bytes(step: Callable[[], None], model: nn.Module) -> dict:
    """Tensors autograd saves for backward during one step, split into parameters and everything else."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    other: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            other[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return {"saved_non_param_bytes": sum(other.values())}


def _use_autograd_synthesis(model: nn.Module) -> int:
    from repconv.convert.replacement import synthesize, synthesize_autograd

    def plain(a, b, prev, next, neighbor_grad=False):
        if not neighbor_grad:
            prev, next = prev.detach(), next.detach()
        return synthesize_autograd(a, b, prev, next)

    n = 0
    for node in model.graph.nodes:
        if node.op == "call_function" and node.target is synthesize:
            node.target, n = plain, n + 1
    model.recompile()
    return n


TRAINING = {
    "cifar_resnet56": {"arch": "cifar_resnet56", "size": 32, "batch": 128, "optimizer": "sgd", "lr": 0.1,
                       "classes": 10, "warmup_steps": 3, "steps": 20},
    "vit_b_16": {"arch": "vit_b_16", "size": 224, "batch": 32, "optimizer": "adamw", "lr": 1e-3, "classes": 1000,
                 "warmup_steps": 3, "steps": 10},
}
QUICK_TRAINING = {  # the CPU dry run: same code, toy sizes; cifar_vit stands in for ViT-B/16
    "cifar_resnet56": {"batch": 4, "warmup_steps": 1, "steps": 2},
    "vit_b_16": {"arch": "cifar_vit", "size": 32, "batch": 4, "classes": 10, "warmup_steps": 1, "steps": 2},
}


def _arm(spec: dict, arm: str, device: str, amp: bool, deadline: Deadline) -> dict:
    from repconv.train.loop import TrainConfig, make_optimizer, objective_loss, set_trainable

    torch.manual_seed(0)
    model = build(spec["arch"], num_classes=spec["classes"])
    info = {"arm": arm, "arch": spec["arch"], "batch": spec["batch"], "size": spec["size"]}
    if arm != "end-to-end":
        from repconv.convert.replacement import replaced_units

        model = convert_every(model, 2, spec["arch"])
        info["replaced_units"] = len(replaced_units(model))
        if arm == "replace-every-2 (autograd synthesis)":
            info["synthesis_nodes"] = _use_autograd_synthesis(model)
    cfg = TrainConfig(optimizer=spec["optimizer"], lr=spec["lr"], trainable="all", objective="ce")
    set_trainable(model, "all")
    model.to(device).train()
    opt = make_optimizer(cfg, model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(spec["batch"], 3, spec["size"], spec["size"], generator=g).to(device)
    y = torch.randint(0, spec["classes"], (spec["batch"],), generator=g).to(device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            loss = objective_loss(cfg, model(x), y, None)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    for _ in range(spec["warmup_steps"]):
        step()  # the first allocates the optimizer state
    sync(device)
    times = []
    for _ in range(spec["steps"]):
        if deadline.near(3):
            break
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    if device == "cuda":
        info["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        info["allocated_before_bytes"] = before
    params = [p for p in model.parameters()]
    info.update(params=sum(p.numel() for p in params), param_bytes=_bytes(params), grad_bytes=_bytes(params),
                optimizer_state_bytes=sum(_bytes(v for v in s.values() if torch.is_tensor(v) and v.ndim > 0)
                                          for s in opt.state.values()),
                step_s=statistics.median(times) if times else None, timed_steps=len(times))
    with torch.autocast(device, dtype=torch.bfloat16) if amp else contextlib.nullcontext():
        info.update(_saved_bytes(lambda: objective_loss(cfg, model(x), y, None).backward(), model))
    opt.zero_grad(set_to_none=True)
    return info  # the model and optimizer go with this frame; the caller empties the CUDA cache


def part_training(args, deadline: Deadline) -> dict:
    cuda = args.device == "cuda"
    device = args.device
    arms = ("end-to-end", "replace-every-2", "replace-every-2 (autograd synthesis)")
    specs = {k: {**v, **(QUICK_TRAINING[k] if args.quick else {})} for k, v in TRAINING.items()}
    config = {"models": specs, "arms": list(arms), "amp": "bf16 autocast" if cuda else "off (fp32)",
              "trainable": "all (the papers' setting: replaced units keep only their two scalars)",
              "data": "one fixed random batch", "step": "forward, loss, backward, optimizer step, zero_grad"}
    checks: dict = {}
    results: dict = {}
    if cuda:
        torch.backends.cudnn.benchmark = True
    for name, spec in specs.items():
        rows = {}
        for arm in arms:
            key = f"{name}/{arm}"
            if deadline.near(10):
                checks[key] = skipped("part time cap reached before this arm")
                continue
            try:
                rows[arm] = _arm(spec, arm, device, cuda, deadline)
                timed = rows[arm]["step_s"]
                checks[key] = check("ok" if timed else "failed", None if timed else "no step timed before the cap",
                                    step_s=timed, peak_allocated_bytes=rows[arm].get("peak_allocated_bytes"))
            except Exception as exc:
                checks[key] = check("failed", f"{type(exc).__name__}: {str(exc)[:500]}")
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        e2e = rows.get("end-to-end")
        for arm, row in rows.items():
            if e2e and arm != "end-to-end":
                row["vs_end_to_end"] = {
                    "step_time": row["step_s"] / e2e["step_s"] if row["step_s"] and e2e["step_s"] else None,
                    "peak_memory": (row["peak_allocated_bytes"] / e2e["peak_allocated_bytes"]
                                    if cuda else None),
                    "params_grads_optimizer_bytes_saved": (e2e["param_bytes"] + e2e["grad_bytes"]
                                                           + e2e["optimizer_state_bytes"]) -
                                                          (row["param_bytes"] + row["grad_bytes"]
                                                           + row["optimizer_state_bytes"]),
                    "saved_for_backward_extra_bytes": row["saved_non_param_bytes"] - e2e["saved_non_param_bytes"]}
        results[name] = rows
    if not cuda:
        checks["peak_memory_cuda"] = skipped(CUDA_ONLY + " (torch.cuda.max_memory_allocated)", cuda_only=True)
        checks["bf16_autocast"] = skipped(CUDA_ONLY, cuda_only=True)
    return {"config": config, "checks": checks, "results": results}


# ---------------------------------------------------------------- part 4: DDP under torchrun


DDP_CFG = {"arch": "cifar_resnet20", "size": 32, "batch": 32, "steps": 20, "lr": 0.05}
QUICK_DDP_CFG = {"batch": 8, "steps": 2}


def run_ddp(payload: dict) -> dict:
    """repconv's fit, then an explicit DDP loop, in this process; under torchrun with a process group."""
    import torch.distributed as dist

    from repconv.train.loop import TrainConfig, fit

    cfg = payload["cfg"]
    distributed = "RANK" in os.environ
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    if distributed:
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    try:
        train_set, data = dataset("train", cfg["size"], 256)
        torch.manual_seed(0)
        model = convert_every(build(cfg["arch"]), 2, cfg["arch"])
        tcfg = TrainConfig(epochs=1, batch_size=cfg["batch"], lr=cfg["lr"], optimizer="sgd", trainable="all",
                           amp="off", batches_per_epoch=cfg["steps"], seed=0)
        res = fit(model, train_set, tcfg)
        fit_params = torch.cat([p.detach().flatten().double() for p in model.parameters()])
        torch.manual_seed(0)
        net = build(cfg["arch"]).to(device)
        ddp_wrapped = distributed
        if distributed:
            net = nn.parallel.DistributedDataParallel(net, device_ids=[0] if device == "cuda" else None)
        opt = torch.optim.SGD(net.parameters(), lr=cfg["lr"], momentum=0.9)
        loader = torch.utils.data.DataLoader(train_set, batch_size=cfg["batch"], shuffle=False)
        for _, (x, y) in zip(range(cfg["steps"]), loader, strict=False):
            nn.functional.cross_entropy(net(x.to(device)), y.to(device)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        raw = net.module if distributed else net
        loop_params = torch.cat([p.detach().flatten().double().cpu() for p in raw.parameters()])
        backend = dist.get_backend() if distributed else None
    finally:
        if distributed:
            dist.destroy_process_group()
    torch.save({"fit": fit_params, "loop": loop_params}, payload["out"])
    return {"distributed": distributed, "backend": backend, "ddp_wrapped": ddp_wrapped, "device": device,
            "data": data, "fit_world_size": res.world_size, "fit_ranks_in_sync": res.ranks_in_sync,
            "fit_train_loss": res.train_loss}


def part_ddp(args, deadline: Deadline) -> dict:
    cuda = args.device == "cuda"
    cfg = {**DDP_CFG, **(QUICK_DDP_CFG if args.quick else {})}
    backend = "nccl" if cuda else "gloo"
    config = {**cfg, "backend": backend, "world_size": 1, "launcher": "python -m torch.distributed.run "
              "--standalone --nproc_per_node 1", "note": "repconv's fit wraps the model in DDP only when "
              "WORLD_SIZE > 1, so at world size 1 it runs its collectives (metrics all_reduce, the ranks-in-sync "
              "all_gather) on the process group; the explicit loop wraps the model in DistributedDataParallel"}
    checks: dict = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-ddp-") as tmp:
        env = {"TMPDIR": tmp, **({} if cuda else {"CUDA_VISIBLE_DEVICES": ""})}  # torchrun's log folder goes too
        runs = {}
        for kind in ("plain", "torchrun"):
            out = str(Path(tmp) / f"{kind}.pt")
            cmd = worker_cmd("ddp", {"cfg": cfg, "out": out})
            if kind == "torchrun":
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                       *cmd[1:]]
            try:
                runs[kind] = subprocess_json(cmd, deadline.left(), env)
                runs[kind]["tensors"] = torch.load(out)
            except Exception as exc:
                checks[f"{kind}_run"] = check("failed", f"{type(exc).__name__}: {str(exc)[:1500]}")
        if len(runs) == 2:
            p, d = runs["plain"], runs["torchrun"]
            diffs = {k: float((p["tensors"][k] - d["tensors"][k]).abs().max()) for k in ("fit", "loop")}
            values = {"backend": d["backend"], "ddp_wrapped": d["ddp_wrapped"], "fit_ranks_in_sync":
                      d["fit_ranks_in_sync"], "fit_params_max_abs_diff": diffs["fit"],
                      "ddp_loop_params_max_abs_diff": diffs["loop"], "fit_train_loss": d["fit_train_loss"],
                      "fit_train_loss_plain": p["fit_train_loss"], "data": d["data"]}
            ok = max(diffs.values()) <= TOLERANCES["ddp_params_max_abs"] and d["fit_ranks_in_sync"] is True
            checks[f"{backend}_world1_vs_plain"] = within(ok, values, f"parameter differences {diffs}")
    if not cuda:
        checks["nccl_world1_vs_plain"] = skipped(CUDA_ONLY + " (NCCL); the same check ran on gloo", cuda_only=True)
    return {"config": config, "checks": checks}


# ---------------------------------------------------------------- driver and report


# ---------------------------------------------------------------- part 5: the search on the device

SEARCH_TARGETS = {"torch-nchw": None, "ort-cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def _search_once(ckpt: Path, out: Path, device: str, target: str) -> dict:
    import repconv
    from repconv.search.damage import DamageOptions
    from repconv.search.run import SearchOptions, search
    from repconv.train.local import LocalOptions

    opts = SearchOptions(target=target, device=device, threads=2, units=("layer3.*",), kinds=("pf-avg", "pf-max"),
                         damage=DamageOptions(steps=2, batch_size=32), train_images=64, eval_images=64,
                         refit_images=64, latency_rounds=1, latency_block=3, latency_warmup=1, verify_rounds=1,
                         local=LocalOptions(epochs=0, batch_size=32), global_epochs=2, batches_per_epoch=2,
                         refit="auto", latency_tolerance=0.5)  # the defaults: no local stage, the refit raced
    started = time.perf_counter()
    res = search(ckpt, "digits", out, max_drop=100.0, options=opts)
    values = {"seconds": round(time.perf_counter() - started, 1), "choice": res.selection.choice,
              "predicted_ratio": res.selection.predicted_ratio, "measured_ratio": res.latency_ratio,
              "agreement": res.agreement, "table_s": res.seconds.get("table"), "start": res.start}
    loaded = repconv.load_checkpoint(res.checkpoint)  # on the CPU, whatever trained it
    folded = repconv.fold(res.checkpoint, output=out / "folded.repconv.safetensors")
    exported = repconv.export(res.checkpoint, out / "searched.onnx", exporter="legacy")
    values |= {"fold_parity_max_rel": folded.parity.max_rel, "onnx_verified": bool(exported.verified),
               "loaded_on": str(next(loaded.model.parameters()).device)}
    ok = bool(res.selection.choice) and folded.parity.max_rel <= TOLERANCES["fold_parity_max_rel"] and \
        exported.verified and values["loaded_on"] == "cpu"
    return within(ok, values, "the searched checkpoint did not load, fold or export as any other")


def part_search(args, deadline: Deadline) -> dict:
    need = missing("scipy", "onnx", "onnxruntime", "safetensors", "torchvision")
    config = {"model": "cifar_resnet20 (seed 0, untrained)", "data": "digits", "units": "layer3.*",
              "device": args.device, "targets": list(SEARCH_TARGETS)}
    if need:
        reason = f"the search needs {', '.join(need)}, which this Python cannot import"
        return {"config": config, "checks": {t: skipped(reason) for t in SEARCH_TARGETS}}
    import onnxruntime

    from repconv.checkpoint import CheckpointMeta, save
    from repconv.models import resolve_arch

    checks: dict = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-search-") as tmp:
        folder = Path(tmp)
        torch.manual_seed(0)
        ckpt = folder / "model.repconv.safetensors"
        save(ckpt, build("cifar_resnet20").eval(), CheckpointMeta.for_arch(resolve_arch("cifar_resnet20")))
        providers = onnxruntime.get_available_providers()
        for target, provider in SEARCH_TARGETS.items():
            key = f"search_{target}"
            if provider is not None and args.device != "cuda":
                checks[key] = skipped(CUDA_ONLY, cuda_only=True)
            elif provider is not None and provider not in providers:
                checks[key] = skipped(f"onnxruntime {onnxruntime.__version__} has no {provider}")
            elif deadline.near(20):
                checks[key] = skipped("the part's time cap was nearly spent")
            else:
                try:
                    checks[key] = _search_once(ckpt, folder / target, args.device, target)
                except Exception as exc:
                    checks[key] = check("failed", f"{type(exc).__name__}: {exc}")
    return {"config": config, "checks": checks}


def run_part(name: str, args, cap: float) -> dict:
    started = time.perf_counter()
    info = {"torch": torch.__version__, "cuda_runtime": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "machine_at_start": {"loadavg_1m": loadavg(), "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
    deadline = Deadline(cap)
    body: dict = {}
    try:
        if name in ("correctness_digits", "correctness_resnet50"):
            need = missing("torchvision")
            if need:
                body = {"checks": {"all": skipped(f"needs {', '.join(need)}")}}
            else:
                with time_cap(cap + 5):
                    body = part_correctness(name.split("_", 1)[1], args, deadline)
        else:
            fn = {"cli": part_cli, "latency_parameter_free": part_latency, "training_cost": part_training,
                  "ddp": part_ddp, "search": part_search}[name]
            with time_cap(cap + 5):
                body = fn(args, deadline)
        status, reason = part_status(body["checks"])
    except PartTimeout as exc:
        status, reason = "failed", str(exc)
    except Exception as exc:
        status, reason = "failed", f"{type(exc).__name__}: {exc}"
        body["traceback"] = traceback.format_exc()[-3000:]
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    info["machine_at_end"] = {"loadavg_1m": loadavg()}
    return {"status": status, "reason": reason, "seconds": round(time.perf_counter() - started, 1), "cap_s": cap,
            "config": body.get("config", {}), "checks": body.get("checks", {}), "results": body.get("results", {}),
            **({"traceback": body["traceback"]} if "traceback" in body else {}), "machine": info}


def _fmt(x, unit: str = "") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}{unit}"
    return f"{x}{unit}"


def summary_markdown(report: dict) -> str:
    m = report["machine"]
    lines = ["# repconv GPU check", "",
             f"Command: `{' '.join(report['command'])}`; started {m['utc']}, wall {report['wall_s']} s.",
             f"Machine: {m.get('gpu') or 'no GPU'} (driver {m.get('driver') or '-'}, CUDA {m.get('cuda_runtime')}), "
             f"{m.get('cpu', '-')} x {m['cpu_count']}, torch {m['torch']}, torchvision {m.get('torchvision', '-')}, "
             f"load average {m['loadavg_1m']}.", "",
             "| part | status | s | cap s | reason |", "|---|---|---|---|---|"]
    for name, p in report["parts"].items():
        lines.append(f"| {name} | {p['status']} | {p['seconds']} | {p['cap_s']:.0f} | {(p['reason'] or '')[:200]} |")
    for name, p in report["parts"].items():
        lines += ["", f"## {name}: {p['status']}", "", "| check | status | values / reason |", "|---|---|---|"]
        for key, c in p["checks"].items():
            vals = {k: v for k, v in c.items() if k not in ("status", "reason", "tolerances", "cuda_only")
                    and not isinstance(v, list) and (not isinstance(v, dict) or len(v) <= 4)}
            vals = {k: {a: _fmt(b) for a, b in v.items()} if isinstance(v, dict) else v for k, v in vals.items()}
            text = c["reason"] if c["status"] != "ok" else ", ".join(f"{k} {_fmt(v)}" for k, v in vals.items())
            lines.append(f"| {key} | {c['status']} | {(text or '')[:300]} |")
        if name == "latency_parameter_free" and p["results"].get("fastest"):
            lines += ["", "Per configuration, the mode in which resnet50 is fastest (speed-ups vs resnet50 paired "
                      "within rounds; paper: R50-max 1.28x, R50-hybrid 1.19x):", "",
                      "| config | mode | resnet50 ms | R50-max ms (x) | R50-hybrid ms (x) |", "|---|---|---|---|---|"]
            for key, r in p["results"]["fastest"].items():
                mx, hy = r["pf_resnet50_max"], r["pf_resnet50_hybrid"]
                lines.append(f"| {key} | {r['mode']} | {r['resnet50']['median_ms']:.3f} | {mx['median_ms']:.3f} "
                             f"({mx['speedup']:.2f}x) | {hy['median_ms']:.3f} ({hy['speedup']:.2f}x) |")
        if name == "training_cost" and p["results"]:
            lines += ["", "| model (arch, batch, px) | arm | step s | peak MiB | params+grads+opt MiB | saved for "
                      "backward MiB | step vs e2e | peak vs e2e |", "|---|---|---|---|---|---|---|---|"]
            for model, rows in p["results"].items():
                for arm, r in rows.items():
                    pgo = (r["param_bytes"] + r["grad_bytes"] + r["optimizer_state_bytes"]) / 2**20
                    vs = r.get("vs_end_to_end", {})
                    peak = r.get("peak_allocated_bytes")
                    lines.append(f"| {model} ({r['arch']}, {r['batch']}, {r['size']}) | {arm} | {_fmt(r['step_s'])} | "
                                 f"{_fmt(peak / 2**20 if peak else None)} | {pgo:.1f} | "
                                 f"{r['saved_non_param_bytes'] / 2**20:.1f} | {_fmt(vs.get('step_time'))} | "
                                 f"{_fmt(vs.get('peak_memory'))} |")
            lines += ["", "params+grads+opt: the parameters, their gradients and the optimizer state (what a replaced "
                      "unit no longer has); saved for backward: the tensors autograd keeps between forward and "
                      "backward that are not parameters (one step, counted once per storage)."]
    return "\n".join(lines) + "\n"


def write_outputs(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "summary.md").write_text(summary_markdown(report))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                    help="auto: cuda when torch sees a GPU (default)")
    ap.add_argument("--quick", action="store_true", help="toy sizes (the CPU dry run in CI)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {','.join(PARTS)}")
    ap.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget for all parts together")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile in the latency part")
    ap.add_argument("--cap-s", type=float, help="one time cap for every part (default: each part's own)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--payload", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        payload = json.loads(args.payload)
        result = run_pipeline(payload) if args.worker == "pipeline" else run_ddp(payload)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result, default=str))
        return 0
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA GPU", file=sys.stderr)
        return 2
    if args.device == "cpu" and torch.cuda.is_available():
        global CUDA_ONLY
        CUDA_ONLY = "a CUDA check, and this run is --device cpu"
    if args.quick and args.device == "cpu":  # toy sizes: one thread, and no spinning OpenMP barriers on busy CI
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"  # the worker processes
    if args.cap_s:
        for name in PARTS:
            (QUICK_CAPS_S if args.quick else CAPS_S)[name] = args.cap_s
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        print(f"unknown part(s) {unknown}; choose from {PARTS}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    report = {"schema": SCHEMA, "command": [Path(sys.executable).name, *sys.argv],
              "config": {"device": args.device, "quick": args.quick, "parts": parts, "budget_s": args.budget_s,
                         "compile": args.compile, "caps_s": QUICK_CAPS_S if args.quick else CAPS_S,
                         "threads": torch.get_num_threads()},
              "machine": machine(), "parts": {}, "wall_s": None}
    caps = QUICK_CAPS_S if args.quick else CAPS_S
    for name in parts:
        left = args.budget_s - (time.perf_counter() - started)
        if left < 10:
            report["parts"][name] = {"status": "skipped", "reason": f"the --budget-s {args.budget_s:.0f} s was spent",
                                     "seconds": 0.0, "cap_s": 0.0, "config": {}, "checks": {}, "results": {},
                                     "machine": {}}
        else:
            print(f"[gpu_check] {name} (cap {min(caps[name], left):.0f} s) ...", file=sys.stderr, flush=True)
            report["parts"][name] = run_part(name, args, min(caps[name], left))
            print(f"[gpu_check] {name}: {report['parts'][name]['status']} in {report['parts'][name]['seconds']} s"
                  + (f" ({report['parts'][name]['reason'][:300]})" if report["parts"][name]["reason"] else ""),
                  file=sys.stderr, flush=True)
        report["wall_s"] = round(time.perf_counter() - started, 1)
        write_outputs(report, args.out)  # after every part, so a crash later keeps what was measured
    report["machine"]["loadavg_1m_at_end"] = loadavg()
    write_outputs(report, args.out)
    print(f"[gpu_check] wrote {args.out / 'gpu_check.json'} and {args.out / 'summary.md'} ({report['wall_s']} s)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
