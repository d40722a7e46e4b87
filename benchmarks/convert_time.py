"""Wall time of `repconv convert` on a resnet50 checkpoint: the whole command, and the stages inside it.

    python benchmarks/convert_time.py [--quick] [--repeats 3] [--out convert_time.json]

The CLI figure includes starting Python and importing torch + torchvision, which this script also
measures on its own, so the work repconv does can be told apart from the fixed start-up cost.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table


def wall(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def in_process(ckpt: Path, out: Path) -> dict[str, float]:
    import repconv
    from repconv.checkpoint import load_checkpoint as load

    t0 = time.perf_counter()
    loaded = load(ckpt, arch="resnet50")
    t1 = time.perf_counter()
    repconv.convert(loaded, output=out)
    t2 = time.perf_counter()
    return {"load_s": t1 - t0, "convert_and_save_s": t2 - t1, "total_s": t2 - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one repeat")
    ap.add_argument("--out", type=Path, default=Path("convert_time.json"))
    args = ap.parse_args()
    repeats = 1 if args.quick else args.repeats

    import torch
    import torchvision

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / f"{args.arch}.pt"
        torch.save(torchvision.models.get_model(args.arch).state_dict(), ckpt)
        out = Path(tmp) / "out.repconv.safetensors"
        py = sys.executable
        cli = [py, "-m", "repconv", "convert", str(ckpt), "--arch", args.arch, "-o", str(out)]
        imports = [wall([py, "-c", "import torch, torchvision"]) for _ in range(repeats)]
        cli_runs = [wall(cli) for _ in range(repeats)]
        inproc = [in_process(ckpt, out) for _ in range(repeats)]

    med = statistics.median
    result = {
        "arch": args.arch,
        "cli_wall_s": med(cli_runs),
        "import_torch_torchvision_s": med(imports),
        "in_process_load_s": med(r["load_s"] for r in inproc),
        "in_process_convert_and_save_s": med(r["convert_and_save_s"] for r in inproc),
        "in_process_total_s": med(r["total_s"] for r in inproc),
        "target_s": 5.0,
        "raw": {"cli_wall_s": cli_runs, "import_s": imports, "in_process": inproc},
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "torchvision": torchvision.__version__},
    }
    table = Table(title=f"repconv convert {args.arch} (median of {repeats})")
    table.add_column("measure")
    table.add_column("seconds", justify="right")
    for key in ("cli_wall_s", "import_torch_torchvision_s", "in_process_load_s", "in_process_convert_and_save_s",
                "in_process_total_s"):
        table.add_row(key, f"{result[key]:.2f}")
    Console().print(table)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
