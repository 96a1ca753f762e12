#!/usr/bin/env bash
# The GPU benchmarks of the training and serving issues, in one call on a CUDA machine:
#
#   bash benchmarks/gpu.sh [OUT]         # results (JSON + markdown) and logs under OUT
#
# 1. the device's bf16 matrix-product rate (8192^3, the ceiling MFU is read against);
# 2. benchmarks/sampler.py at the 1.3B preset in bf16: the official demo's loop vs our sampler
#    (batch 8, 30 steps, CFG 2, random weights);
# 3. benchmarks/train_throughput.py, stage 2 at the 1.3B preset in bf16 (tokens/s, images/s, MFU),
#    with the dense packed mask (SDPA), then with FlexAttention's block mask (`attention: flex`)
#    and the frozen encoders' outputs read from a latent cache (`latent_cache:`);
# 4. flex_check: the CUDA test that FlexAttention's losses and gradients equal the dense mask's;
# optional (name them in ONLY):
# 5. train_compile: step 3 with torch.compile per transformer block (config `compile: true`);
# 6. sampler_compile: the sampler with the torch.compile backend (on 2026-11-30 its whole-graph
#    compile had not finished after 210 s on an H200);
# 7. shapes: benchmarks/shapes_scale.py, the shapes world's recipe at 10x its steps (bootstrap 3x)
#    with GenEval-shapes / VQA after 1600, 4800 and 16,000 stage-2 steps (issue 5's gates); no new
#    stage-2 chunk starts in its last 150 s, so the points measured by then come back.
# ONLY="train train_flex" runs just the steps named (matmul, sampler, train, train_flex, flex_check,
# train_compile, sampler_compile, shapes); unset, steps 1-4 run (9 minutes at most).
# The limits fit one call in a session's 15 device minutes (machine start ~30 s); the reply of the
# device tool carries only the output's tail and at most 8 files, so pack OUT afterwards, e.g.
#   bash benchmarks/gpu.sh /tmp/res; tar -C /tmp/res -cf $OUT/results.tar .
# Each step has its own time limit, so a slow step loses its own numbers only. Python packages the
# machine lacks (diffusers) are installed from wheels in .whl/ when that folder exists.
set -uo pipefail
OUT=${1:-${OUT:-benchmarks/results}}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv
python3 -c "import torch, transformers, diffusers; print('torch', torch.__version__, '| transformers',
transformers.__version__, '| diffusers', diffusers.__version__)"

DEFAULT_STEPS="matmul sampler train train_flex flex_check"
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    case " ${ONLY:-$DEFAULT_STEPS} " in *" $name "*) ;; *) return 0 ;; esac
    echo "== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 15 "$OUT/$name.log"
    echo "== $name: exit $rc after $((SECONDS - start))s"
}

step matmul 30 python3 -c "
import torch, time
a, b = (torch.randn(8192, 8192, device='cuda', dtype=torch.bfloat16) for _ in range(2))
for _ in range(3): a @ b
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(20): a @ b
torch.cuda.synchronize(); s = (time.perf_counter() - t) / 20
print(f'bf16 8192^3 matmul: {2 * 8192**3 / s / 1e12:.0f} TFLOP/s')"
step sampler ${SAMPLER_LIMIT:-120} python3 benchmarks/sampler.py --preset janusflow-1.3b --device cuda \
    --dtype bf16 --backends official torch --repeats 5 --out "$OUT"
step train ${TRAIN_LIMIT:-120} python3 benchmarks/train_throughput.py --preset janusflow-1.3b --stages 2 \
    --device cuda --dtype bf16 --rows 4 --max-len 4096 --steps 5 --warmup 2 --profile --out "$OUT"
step train_flex ${TRAIN_FLEX_LIMIT:-180} python3 benchmarks/train_throughput.py --preset janusflow-1.3b --stages 2 \
    --device cuda --dtype bf16 --rows 4 --max-len 4096 --steps 5 --warmup 2 --attention flex --latent-cache \
    --out "$OUT"
step flex_check 90 python3 -m pytest -q -p no:cacheprovider tests/test_packed_loss.py -k flex
step train_compile ${TRAIN_COMPILE_LIMIT:-150} python3 benchmarks/train_throughput.py --preset janusflow-1.3b \
    --stages 2 --device cuda --dtype bf16 --rows 4 --max-len 4096 --steps 5 --warmup 2 --compile \
    --out "$OUT/compile"
step sampler_compile ${COMPILE_LIMIT:-150} python3 benchmarks/sampler.py --preset janusflow-1.3b \
    --device cuda --dtype bf16 --backends official torch-compile --repeats 3 --out "$OUT/compile"
step shapes ${SHAPES_LIMIT:-560} python3 benchmarks/shapes_scale.py --device cuda --dtype bf16 \
    --scale 10 --bootstrap-scale 3 --points 1,3,10 --budget-s $(( ${SHAPES_LIMIT:-560} - 150 )) \
    --out "$OUT/shapes"
