#!/usr/bin/env bash
# Device checks of the CUDA backend, for a GPU machine with torch and triton preinstalled
# and nothing reachable from it (how it ran: README, "On NVIDIA GPUs"). From the repository root:
#   bash bench/gpu_check.sh            # logs and bench/gpu_decode.py's JSON under $OUT
# 1. the Triton kernel tests on the GPU (every format pair against the torch reference,
#    store bytes, shapes, splits, rotation) and the tiny-model HF parity test on CUDA;
# 2. decode tokens/s for every KV format on random weights with SmolLM2-135M's and
#    Llama-3.2-1B's shapes, at 1/16/64/256 sequences x 1k/8k contexts.
# Needs the project's Python dependencies that such a machine may lack (pydantic): `make
# gpu-wheels` here puts them in .whl/ (for Python 3.10-3.13: the device's version is not
# known in advance), `run` carries it (carry [".whl"]), and the wheels for the device's
# Python are installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    # by name, so that pip picks each one's wheel for this Python among the versions there
    names=$(ls .whl/*.whl | sed 's#.*/##; s/-.*//' | sort -u)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --find-links .whl --target /tmp/site $names && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
start=$(date +%s)
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/machine.txt"
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
python3 -m pytest tests/unit/test_triton_backend.py -q -p no:cacheprovider $workers 2>&1 | tee "$OUT/tests.log"
tests=${PIPESTATUS[0]}
echo "tests: exit $tests after $(( $(date +%s) - start )) s" | tee -a "$OUT/tests.log"
python3 bench/gpu_decode.py --json "$OUT/gpu_decode.json" --profile fp16,int8 ${GPU_BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
bench=${PIPESTATUS[0]}
echo "tests exit $tests, bench exit $bench, $(( $(date +%s) - start )) s in all" | tee -a "$OUT/bench.log"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
