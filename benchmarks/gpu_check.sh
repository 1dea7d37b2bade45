#!/usr/bin/env bash
# GPU check of the fast paths, for a CUDA machine: one prepared script, a total timeout.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # default OUT_DIR: ${OUT:-benchmarks/out}
#
# 1. the fast-path tests on CPU (tiny models, seconds);
# 2. the exact path vs each fast path on the GPU (tiny Glow: log p(x) within the stated
#    tolerances, tf32 and bf16 included);
# 3. the standard-ref benchmark (L=3, K=32, 512 hidden, 3x32x32) on the GPU: images/s,
#    peak CUDA memory and achieved FLOP/s against PEAK_TFLOPS (default 989: H100/H200
#    dense bf16; pass the chip's figure for the precision you compare against).
# Everything is bounded by TOTAL_S seconds (default 480); each step writes its JSON or
# log to OUT_DIR, so a timeout still leaves what finished.
set -u
OUT_DIR="${1:-${OUT:-benchmarks/out}}"
TOTAL_S="${TOTAL_S:-480}"
PEAK_TFLOPS="${PEAK_TFLOPS:-989}"
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && PY="${PYTHON:-.venv/bin/python}"
mkdir -p "$OUT_DIR"
start=$(date +%s)
left() { echo $(( TOTAL_S - ($(date +%s) - start) )); }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT_DIR/gpu.txt" 2>&1
"$PY" -c "import torch; print(torch.__version__, torch.cuda.is_available(), torch.cuda.get_device_name(0))" \
    >> "$OUT_DIR/gpu.txt" 2>&1
cat "$OUT_DIR/gpu.txt"

echo "== 1. fast-path tests (CPU)"
timeout "$(left)" "$PY" -m pytest -q -x tests/test_fast_path.py > "$OUT_DIR/tests.log" 2>&1
echo "tests rc=$?"; tail -3 "$OUT_DIR/tests.log"

echo "== 2. fast paths vs exact on CUDA (tiny Glow)"
timeout "$(left)" "$PY" - > "$OUT_DIR/cuda_equivalence.json" 2> "$OUT_DIR/cuda_equivalence.log" <<'EOF'
import json, math, torch
from ood_audit.data import bits_per_dim
from ood_audit.models.glow import Glow, GlowConfig
shape = (3, 16, 16)
torch.manual_seed(0)
dev = torch.device("cuda")
def build():
    torch.manual_seed(0)
    m = Glow(GlowConfig(levels=2, steps=4, hidden=64), shape).to(dev)
    m.data_init(torch.rand(32, *shape, device=dev))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()
x = torch.rand(64, *shape, device=dev)
def score(m):
    with torch.inference_mode():
        return m.log_prob(x).double()
exact = score(build())
out = {}
tol = {"channels_last": ("rel", 1e-5), "compile": ("rel", 1e-5), "tf32": ("bpd", 1e-2),
       "bf16": ("bpd", 1e-2), "channels_last+tf32+bf16": ("bpd", 1e-2)}
for path, (kind, limit) in tol.items():
    m = build()
    try:
        for name in path.split("+"):
            m.set_fast_path(name, True)
        got = score(m)
    except Exception as exc:  # report, keep going
        out[path] = {"error": repr(exc)[:300]}
        continue
    rel = float(((got - exact).abs() / exact.abs()).max())
    bpd = float((bits_per_dim(got, math.prod(shape)) - bits_per_dim(exact, math.prod(shape))).abs().max())
    err = rel if kind == "rel" else bpd
    out[path] = {"max_rel_log_px": rel, "max_abs_bpd": bpd, "tolerance": f"{kind} {limit}",
                 "ok": err <= limit}
print(json.dumps(out, indent=2))
EOF
echo "equivalence rc=$?"; cat "$OUT_DIR/cuda_equivalence.json"

echo "== 3. standard-ref benchmark on CUDA"
timeout "$(left)" "$PY" benchmarks/throughput.py --device cuda --config standard-ref \
    --paths naive,exact,channels_last,tf32,bf16,channels_last+tf32+bf16,channels_last+tf32+bf16+compile \
    --repeats 5 --warmup 2 --peak-tflops "$PEAK_TFLOPS" --child-timeout 240 \
    --out "$OUT_DIR/standard_ref_cuda.json" 2> "$OUT_DIR/benchmark.log" > /dev/null
echo "benchmark rc=$?"; tail -3 "$OUT_DIR/benchmark.log"
echo "done in $(( $(date +%s) - start )) s; results in $OUT_DIR"
