#!/usr/bin/env bash
# On a machine with a GPU: the conformance suite's GPU variants and a short GPU benchmark,
# results and plots under OUT. Installs nothing from the network (the frameworks must be
# there already); finishes within about 12 minutes (the timeouts add up to 765 s).
#
#   bash bench/gpu_check.sh OUT
set -uo pipefail
out="${1:?usage: bash bench/gpu_check.sh OUT}"
mkdir -p "$out"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -m pip install --no-index --no-deps --no-build-isolation -q -e . >"$out/install.log" 2>&1 \
  || echo "editable install failed (see install.log); using PYTHONPATH" | tee -a "$out/summary.txt"
run() { python3 -m reformer_core.cli "$@"; }

{ nvidia-smi || true; python3 -m reformer_core.cli info; } >"$out/info.txt" 2>&1

# Which GPU backends can run here (each skips with its reason otherwise).
gpus=$(python3 - <<'PY'
from reformer_core.conformance.targets import make_target
specs = [s for s in ("torch:cuda", "jax:gpu", "cupy") if make_target(s)[0] is not None]
print(",".join(specs))
PY
)
echo "GPU backends: ${gpus:-none}" | tee -a "$out/summary.txt"
[ -n "$gpus" ] || exit 1

export NVIDIA_TF32_OVERRIDE=0  # correctness runs: no TF32 anywhere
timeout 180 python3 -m reformer_core.cli check --backends "$gpus" --max-examples 20 --json "$out/check.json" \
  >"$out/check.txt" 2>&1; echo "check exit $?" | tee -a "$out/summary.txt"
JAX_ENABLE_X64=1 timeout 90 python3 -m reformer_core.cli check --backends jax:gpu --max-examples 10 \
  --json "$out/check_jax_x64.json" >"$out/check_jax_x64.txt" 2>&1; echo "check jax x64 exit $?" | tee -a "$out/summary.txt"
unset NVIDIA_TF32_OVERRIDE

timeout 120 python3 -m reformer_core.cli bench --backends "$gpus" --speed-figure --repeats 3 --no-progress \
  --json "$out/speed_figure.json" --plot "$out/speed_figure.png" >"$out/speed_figure.txt" 2>&1
echo "speed figure exit $?" | tee -a "$out/summary.txt"
timeout 90 python3 -m reformer_core.cli bench --backends "$gpus" --lengths 1024,4096,16384 --hashes 2,8 --repeats 3 --no-peers \
  --no-progress --json "$out/bench.json" --plot "$out/bench.png" >"$out/bench.txt" 2>&1
echo "bench exit $?" | tee -a "$out/summary.txt"
mem=$(echo "$gpus" | tr ',' '\n' | grep -v cupy | paste -sd, -)
if [ -n "$mem" ]; then  # training-step memory against depth (the CUDA allocator / XLA's analysis)
  timeout 90 python3 -m reformer_core.cli bench --memory --backends "$mem" --depths 2,12 --json "$out/memory.json" \
    >"$out/memory.txt" 2>&1; echo "memory exit $?" | tee -a "$out/summary.txt"
fi
if python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  timeout 60 python3 bench/torch_attention.py --device cuda --json "$out/torch_sdpa.json" >"$out/torch_sdpa.txt" 2>&1
  echo "torch vs SDPA exit $?" | tee -a "$out/summary.txt"
fi
if python3 -c "import torch, triton; assert torch.cuda.is_available()" 2>/dev/null; then
  # The Triton LSH kernel (backends/torch/triton_lsh.py) against the torch-op kernel and SDPA at
  # 4K-32K tokens, bfloat16 and float32; the first call per dtype compiles the kernels.
  timeout 75 python3 bench/triton_vs_sdpa.py --json "$out/triton_vs_sdpa.json" >"$out/triton_vs_sdpa.txt" 2>&1
  echo "triton vs SDPA exit $?" | tee -a "$out/summary.txt"
fi
if python3 -c "import jax; assert jax.default_backend() == 'gpu'" 2>/dev/null; then
  # The JAX Pallas forward of LSH attention (opt-in until this passes) against the standard path.
  REFORMER_JAX_LSH_KERNEL=pallas timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_jax_lsh_kernel.py \
    >"$out/jax_pallas.txt" 2>&1; echo "jax pallas tests exit $?" | tee -a "$out/summary.txt"
fi
