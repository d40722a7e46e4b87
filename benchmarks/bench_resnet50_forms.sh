#!/usr/bin/env bash
# `repconv bench` of resnet50 vs its folded replacement ONNX vs its parameter-free ONNX (docs/bench.md).
#     bash benchmarks/bench_resnet50_forms.sh [OUT_DIR]      (needs repconv installed; ~2.5 min on 2 cores)
set -euo pipefail
out=${1:-bench-resnet50}
mkdir -p "$out" && cd "$out"
python - <<'PY'
import torch, torchvision
torch.manual_seed(0)
m = torchvision.models.resnet50()
for mod in m.modules():  # BN statistics like a trained model's (latency does not depend on the values)
    if isinstance(mod, torch.nn.BatchNorm2d):
        mod.running_mean.uniform_(-0.1, 0.1); mod.running_var.uniform_(0.5, 1.5); mod.weight.data.uniform_(0.2, 0.4)
torch.save(m.state_dict(), "resnet50.pt")
PY
repconv convert resnet50.pt --arch resnet50 --every 2 -o rep.repconv.safetensors
repconv fold rep.repconv.safetensors -o rep-folded.repconv.safetensors
repconv export rep-folded.repconv.safetensors -o rep-folded.onnx
repconv convert resnet50.pt --arch resnet50 --method parameter-free --pf-policy all -o pf-all.repconv.safetensors
repconv export pf-all.repconv.safetensors -o pf-all.onnx
repconv export resnet50.pt --arch resnet50 -o resnet50.onnx
COLUMNS=150 repconv bench resnet50.pt resnet50.onnx rep-folded.onnx pf-all.onnx --arch resnet50 --batch 1,8 \
    --json-out bench.json --plot bench.png
