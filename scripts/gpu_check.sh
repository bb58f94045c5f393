#!/usr/bin/env bash
# The GPU check: what the CPU suite cannot show, run on one CUDA GPU in under 10 minutes, each stage under a
# timeout of its own, in this order:
#   1. the environment: torch, CUDA, cuDNN, the GPU's name and memory;
#   2. the deterministic cumsum probe: what a --deterministic cumsum of one fp64 row at V = 32,000 takes
#      in this torch, and what model.sample_next takes there (it must stay O(rows x V));
#   3. the GPU suite, test_cuda.py;
#   4. scripts/benchmark.py on the tiny and mid configs, with MFU;
#   5. scripts/benchmark.py --compare_hf on mid, where transformers and peft import;
#   6. the CPU suite on this GPU host (its runs take --device cpu whatever GPUs there are), if time is left.
# Writes one markdown file of results (default gpu_check.md) and prints it. On a machine without a GPU it
# says so in one line and exits 0. Works with torch 2.11 and 2.13 CUDA builds; installs nothing.
#
#   scripts/gpu_check.sh [results.md]
#   GPU_CHECK_SECONDS=420 scripts/gpu_check.sh     # the whole check's budget (default 570 s)
set -u
cd "$(dirname "$0")/.."
out=${1:-gpu_check.md}
python=${PYTHON:-python3}
budget=${GPU_CHECK_SECONDS:-570}
start=$(date +%s)

if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check.sh: no CUDA GPU visible to torch here; nothing to check"
    exit 0
fi

logs=$(mktemp -d)
left() { echo $(( budget - ($(date +%s) - start) )); }

# stage NAME SECONDS CMD...: runs CMD under min(SECONDS, what is left of the budget), logs it, and appends
# its status and the tail of its output to the results
stage() {
    local name=$1 want=$2
    shift 2
    local limit t0 rc
    limit=$(left)
    (( limit > want )) && limit=$want
    if (( limit < 20 )); then
        printf '\n## %s\n\nskipped: %s s of the budget left\n' "$name" "$(left)" >> "$out"
        return
    fi
    echo "gpu_check.sh: $name (at most ${limit} s)" >&2
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$logs/$name.log" 2>&1
    rc=$?
    local status="passed"
    (( rc == 124 || rc == 137 )) && status="stopped at its ${limit} s limit"
    (( rc != 0 && rc != 124 && rc != 137 )) && status="failed (exit $rc)"
    printf '\n## %s\n\n%s in %s s.\n\n```\n%s\n```\n' "$name" "$status" "$(( $(date +%s) - t0 ))" \
        "$(grep -v '^\s*$' "$logs/$name.log" | tail -n 40)" >> "$out"
}

{
    echo "# GPU check"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)."
} > "$out"

stage environment 60 "$python" - <<'EOF'
import torch
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
print(f"GPU: {torch.cuda.get_device_name(0)}, {p.total_memory / 2**30:.1f} GiB, {torch.cuda.device_count()} visible")
for name in ("transformers", "peft"):
    try:
        print(name, __import__(name).__version__)
    except ImportError:
        print(name, "not installed")
EOF

stage deterministic-cumsum 60 "$python" - <<'EOF'
import torch
from model import sample_next

V = 32000
def peak(fn):
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    fn(); torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20
row = torch.rand(1, V, dtype=torch.float64, device="cuda")
logits = torch.randn(8, V, device="cuda") * 3
torch.use_deterministic_algorithms(True)
try:
    print(f"deterministic cumsum of one fp64 row of {V}: {peak(lambda: row.cumsum(-1)):.1f} MiB "
          f"(a (rows, V, V) decomposition would take {V * V * 8 / 2**30:.1f} GiB)")
except RuntimeError as e:
    print(f"deterministic cumsum of one fp64 row: {e}".splitlines()[0])
for rows in (1, 8):
    mib = peak(lambda: sample_next(logits[:rows], top_p=0.9, generator=torch.Generator().manual_seed(0)))
    print(f"model.sample_next, {rows} row(s), top-p 0.9, deterministic: {mib:.1f} MiB")
EOF

stage test_cuda 300 "$python" -m pytest -q -p no:cacheprovider test_cuda.py

stage benchmark 150 "$python" scripts/benchmark.py --configs tiny,mid --steps 3 --prepass_world 0 \
    --out "$logs/benchmark.md"
[ -f "$logs/benchmark.md" ] && { echo; cat "$logs/benchmark.md"; } >> "$out"

if "$python" -c "import transformers, peft" 2>/dev/null; then
    stage compare_hf 120 "$python" scripts/benchmark.py --compare_hf --configs mid --steps 2 --repeats 3 \
        --out "$logs/compare_hf.md"
    [ -f "$logs/compare_hf.md" ] && { echo; cat "$logs/compare_hf.md"; } >> "$out"
else
    printf '\n## compare_hf\n\nskipped: transformers or peft does not import here\n' >> "$out"
fi

stage cpu-suite 600 "$python" -m pytest -q -p no:cacheprovider --ignore=test_cuda.py

cat "$out"
