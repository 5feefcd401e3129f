#!/usr/bin/env bash
# Compile the extension WITH the CUDA kernels (FORCE_CUDA=1) into a scratch directory, without
# touching the in-place CPU build, then load the library and check that every crossbar_torch op
# has a CUDA kernel registered. Runs on machines without a GPU (needs nvcc only).
#
#   scripts/check_cuda_build.sh            # exit status 0: compiled and all CUDA kernels present
#
# Env: PYTHON (default .venv/bin/python, else python3), CUDA_HOME (default /usr/local/cuda),
#      TORCH_CUDA_ARCH_LIST (default 8.0), MAX_JOBS (default 2), OUT (scratch dir, default mktemp).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
OUT="${OUT:-$(mktemp -d /tmp/crossbar_cuda_build.XXXXXX)}"
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "check_cuda_build: no nvcc at $CUDA_HOME/bin/nvcc" >&2
  exit 2
fi
mkdir -p "$OUT"
echo "check_cuda_build: compiling with FORCE_CUDA=1 into $OUT (arch $TORCH_CUDA_ARCH_LIST)"
if ! FORCE_CUDA=1 "$PYTHON" setup.py build_ext --build-temp "$OUT/temp" --build-lib "$OUT/lib" \
    > "$OUT/build.log" 2>&1; then
  echo "check_cuda_build: compilation FAILED; last lines of $OUT/build.log:" >&2
  tail -40 "$OUT/build.log" >&2
  exit 1
fi
SO="$(ls "$OUT"/lib/crossbar_torch/_C*.so)"
echo "check_cuda_build: built $SO"
# Fresh interpreter that does not import crossbar_torch (which would register the CPU build).
"$PYTHON" - "$SO" <<'PY'
import sys

import torch

torch.ops.load_library(sys.argv[1])
missing = []
DEVICE_OPS = ("encode", "decode", "effective_weight", "sort_and_encode", "program_layer",
              "compensate", "feedback_quantize", "analog_matmul")
# host only: placement and sort index are chosen at conversion, packing has torch ops on a device,
# rule 24 refines rule 21's targets, which crossbar_torch/feedback.py computes on the host, as
# it does rule 21's factor; one_thread_each shares the host's threads among products
# (crossbar_torch/threads.py)
HOST_OPS = ("chain_order", "sort_index", "pack_levels", "unpack_levels", "feedback_refine",
            "feedback_factor", "one_thread_each")
every = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names()
         if n.startswith("crossbar_torch::")}
unlisted = sorted(every - set(DEVICE_OPS + HOST_OPS))
if unlisted:
    sys.exit("check_cuda_build: ops in neither DEVICE_OPS nor HOST_OPS: " + ", ".join(unlisted))
for op in DEVICE_OPS + HOST_OPS:
    table = torch._C._dispatch_dump_table(f"crossbar_torch::{op}")
    keys = {line.split(":")[0].strip() for line in table.splitlines() if "[kernel]" in line}
    print(f"  {op:18s} kernels: {', '.join(sorted(keys))}")
    missing += [f"{op}/{k}" for k in (("CPU", "CUDA") if op in DEVICE_OPS else ("CPU",))
                if k not in keys]
if missing:
    sys.exit("check_cuda_build: missing kernels: " + ", ".join(missing))
print("check_cuda_build: OK, CPU and CUDA kernels registered for every device op, CPU kernels "
      "for the host-only ones")
PY
