#!/usr/bin/env bash
# The GPU run of engine.py behind benchmarks/README.md: a Qwen2.5-1.5B-shaped model, E = 32 × 256,
# on one CUDA device, as one prepared script (a lent GPU's time is short). Writes each table to
# ${OUT:-.}/engine_*.txt as well as to stdout.
#   1. a smoke run at 2 layers, jets beside torch's forward AD (a Taylor rule missing on CUDA
#      shows as a fallback warning here); the script stops if it fails;
#   2. passes in float32 on a float32 model, against a float32 forward (the pass-cost targets),
#      with a profile of each pass;
#   3. the default policy (float64 values, float32 derivatives) on the bf16 model, against a
#      bf16 forward.
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-.}
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
$py -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
'matmul fp32', torch.backends.cuda.matmul.fp32_precision)"
shape=(--preset qwen2.5-1.5b --device cuda)
timeout 75 $py benchmarks/engine.py "${shape[@]}" --layers 2 --dtype float32 --precision float32 --seqs 4 \
  --tokens 16 --repeats 1 --skip-sampling --compare-engines 2>&1 | tee "$out/engine_smoke.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 1
timeout 170 $py benchmarks/engine.py "${shape[@]}" --dtype float32 --precision float32 --seqs 32 --tokens 256 \
  --repeats 2 --skip-sampling --profile 12 2>&1 | tee "$out/engine_float32.txt"
timeout 100 $py benchmarks/engine.py "${shape[@]}" --dtype bfloat16 --seqs 32 --tokens 256 --repeats 2 \
  --skip-sampling 2>&1 | tee "$out/engine_bf16_auto.txt"
