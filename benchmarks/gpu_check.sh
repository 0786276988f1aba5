#!/usr/bin/env bash
# GPU check: the gpu-marked tests and the kernel benchmarks at the goal shapes on a lent CUDA machine, in under
# 8 minutes, without touching the machine's torch or triton.
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]            # from the repository root; logs go to OUT_DIR (gpu_check_out)
#     WHEELS=wheels bash benchmarks/gpu_check.sh        # offline machine: install what is missing from ./wheels
#
# Offline machines: on a machine with registry access, `pip download -d wheels peft trl accelerate datasets pytest
# hypothesis` (the missing pure-Python packages the first run names), then carry wheels/ over.
#
# Steps, each bounded by `timeout` (seconds; the sum stays under 8 minutes with the install):
#   1. pip install --no-deps -e . ; then only the requirements that are missing or out of range, with a constraints
#      file that pins the installed torch and triton (pip can never replace them);
#   2. pytest -m gpu on the files that hold gpu tests (kernels in bf16 against the fp32 torch path, fused experts,
#      per-sample adapters)                                                      (200 s)
#   3. moe-peft bench ops: the GPU grid, the goal shape (T=8192, d=4096, E=8, r=16, k=2) first         (130 s)
#   4. moe-peft bench experts: a small and a Mixtral-size MoE block, bf16                              (60 s)
# A step that fails or times out is reported and the next one still runs; the exit status is the number of failed
# steps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1  # a step killed by its timeout still leaves every row it printed
START=$SECONDS
FAILED=0

step() {  # step NAME SECONDS COMMAND...: run with a timeout, log to $OUT/NAME.log, record the outcome
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit}s): $*"
    timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
    [ "$rc" -eq 0 ] || FAILED=$((FAILED + 1))
}

python - <<'EOF' | tee "$OUT/summary.txt"
import torch
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "absent"
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE"
print(f"gpu_check | {gpu} | torch {torch.__version__} | triton {tv}")
EOF

# 1. install: moe-peft itself without dependencies, then what is missing, never torch/triton
CONSTRAINTS="$OUT/constraints.txt"
python - "$CONSTRAINTS" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
with open(sys.argv[1], "w") as f:
    for name in ("torch", "triton"):
        try:
            f.write(f"{name}=={version(name)}\n")
        except PackageNotFoundError:
            pass
EOF
PIP=(python -m pip install -q -c "$CONSTRAINTS")
[ -n "${WHEELS:-}" ] && PIP+=(--no-index --find-links "$WHEELS")
# build isolation fetches setuptools from the registry: offline, build with the installed one; failing both, run
# from the source tree (PYTHONPATH), which is all the tests and `python -m moe_peft.apps.cli` need
if ! python -m pip install -q --no-deps -e . && ! python -m pip install -q --no-deps --no-build-isolation -e .; then
    echo "could not pip install moe-peft: running from the source tree" | tee -a "$OUT/summary.txt"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
MISSING=$(python - <<'EOF'
# moe-peft's own requirements (as installed above) plus the test runner, each checked against what is installed
import re
from importlib.metadata import PackageNotFoundError, requires, version
from packaging.requirements import Requirement
try:
    base = [r for r in requires("moe-peft") if "extra ==" not in r]
except PackageNotFoundError:  # not installed: the list in pyproject.toml
    block = re.search(r"^dependencies = \[(.*?)^\]", open("pyproject.toml").read(), re.S | re.M).group(1)
    base = re.findall(r'"([^"]+)"', block)
wanted = base + ["pytest>=8", "hypothesis>=6.100,<7"]
for line in wanted:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate():
        continue
    try:
        ok = req.specifier.contains(version(req.name), prereleases=True)
    except PackageNotFoundError:
        ok = False
    if not ok and req.name not in ("torch", "triton"):
        print(str(req).replace(" ", ""))
EOF
)
if [ -n "$MISSING" ]; then
    echo "installing missing requirements: $MISSING" | tee -a "$OUT/summary.txt"
    # shellcheck disable=SC2086
    "${PIP[@]}" $MISSING || echo "could not install: $MISSING (offline? see WHEELS above)" | tee -a "$OUT/summary.txt"
fi
python -c "import moe_peft, peft, transformers, torch; print('installed: moe_peft', moe_peft.__version__, '| peft', \
peft.__version__, '| transformers', transformers.__version__, '| torch', torch.__version__)" | tee -a "$OUT/summary.txt"
echo "install: $((SECONDS - START)) s" | tee -a "$OUT/summary.txt"

# 2.-4. tests and benchmarks
step gpu_tests 200 python -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_kernels.py tests/test_experts.py \
    tests/test_multi_lora.py
step bench_ops 130 python -m moe_peft.apps.cli bench ops --reps 10
step bench_experts 60 python -m moe_peft.apps.cli bench experts --reps 10

echo "gpu_check: $FAILED failed step(s), $((SECONDS - START)) s in all" | tee -a "$OUT/summary.txt"
exit "$FAILED"
