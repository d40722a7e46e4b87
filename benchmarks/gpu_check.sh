#!/usr/bin/env bash
# The GPU check in one command, from the repository root, with this machine's own python (repconv need not be installed).
cd "$(dirname "$0")/.." && PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-$(command -v python || command -v python3)}" benchmarks/gpu_check.py "$@"
