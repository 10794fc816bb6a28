#!/usr/bin/env bash
# Build, test and benchmark diffusion_fast on one GPU machine (torch and Triton preinstalled,
# no network), in under 10 minutes. Every step is logged to OUTDIR/<step>.log, with a summary
# in OUTDIR/summary.txt. A failing step does not stop the others; the exit status is non-zero
# if any step failed or ran out of time.
#
#   benchmarks/run_gpu.sh OUTDIR        e.g. benchmarks/results/h100-2025-01-31
#
# It writes some 30 files (a log per step, JSON + markdown per bench). Where only a few files can
# come back from the machine (our lent GPU machines return at most 8 from $OUT), pack them:
#   bash benchmarks/run_gpu.sh /tmp/gpu; tar -czf "$OUT/gpu.tgz" -C /tmp gpu
#
# Environment: PYTHON (default python), BUDGET_S (total seconds, default 570),
# BUILD_CAP_S (default 300) and TEST_CAP_S (default 240); the benches share what is left.
# STEPS (default "machine build env_info tests benches"; also "probes": benchmarks/probes/, or the paths in
# PROBES, PROBE_CAP_S each) picks steps, e.g. STEPS=benches on a machine that already built. TESTS (default "tests/ops tests") are pytest's paths and options, e.g.
# TESTS="tests/ops/test_sampler_steps.py -k philox". BENCHES (default: every bench_*.py) names benches in
# the order to run, NAME, NAME:WEIGHT (a share of the bench time in proportion to WEIGHT, default 1) or
# NAME:WEIGHT:OPTION[:OPTION...] (extra options), e.g. BENCHES="group_norm_silu nvae_cell ddpm:3:--dtypes=bf16". A step out of time gets SIGINT first: pytest then still
# prints its failures and writes pytest.xml.
#
# On a lent GPU with 15 minutes in all (about 1.5 of them to start the machine), two calls, the second
# at once while the machine is warm (it goes back 30 s after a call): (1) STEPS="machine build env_info
# tests" BUDGET_S=540 TEST_CAP_S=230 (the build took 99-275 s, 152 s at 5482b3f, ended by nvcc on
# group_norm_silu_cuda.cu; the whole suite needs ~230 s in 16 workers, or TESTS= the files that changed);
# (2) STEPS="benches probes" with BUDGET_S=<what is left minus a minute>. Next lease (untimed since
# h100-2026-11-28: the dwconv 16-bit forward that keeps the conv in y, parameters read in their dtype, the
# one-wave noise grids, cuDNN autotuning in graph capture, the GN forward unroll, the QuickGELU folding):
# TESTS="tests/ops/test_dwconv_bn_swish_tiled.py tests/ops/test_dwconv_bn_swish.py tests/ops/test_sampler_steps.py
# tests/ops/test_langevin_step.py tests/ops/test_dpm2015_step.py tests/ops/test_group_norm_silu.py tests/test_cuda_graphs.py
# tests/test_samplers.py tests/test_cli.py tests/models/test_clip_text.py tests/ops/test_attention.py"; BENCHES="nvae_cell:2:--dtypes=bf16 sampler_step:1:--dtypes=bf16
# group_norm_silu:1:--dtypes=bf16 ddpm:2:--dtypes=bf16:--compile-mode=max-autotune:--providers=eager,compile,cuda+graph"
# PROBES="benchmarks/probes/attention_fwd_sweep.py benchmarks/probes/kernel_breakdown_probe.py" PROBE_CAP_S=100 (the
# sweep now also tries the TMA forward; clip_text, with wheels staged, if time is left). Probes
# reserve PROBE_CAP_S each from the benches' time (default 180): set it to what the probe needs (ncu_probe ~35 s,
# kernel_breakdown ~90 s, attention_fwd_sweep 80-160 s).
# bench_clip_text and the diffusers tests need wheels in .whl/ (see README).
# Each torch.compile case costs 5-40 s there (bench_ddpm compiles the CIFAR-10 UNet per case: ~40 s).
set -u -o pipefail

OUT=${1:?usage: benchmarks/run_gpu.sh OUTDIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
BUDGET_S=${BUDGET_S:-570}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
failed=()

left() { echo $((BUDGET_S - SECONDS)); }

# step NAME CAP_S CMD...: run CMD with a timeout of min(CAP_S, time left), output to NAME.log.
step() {
    local name=$1 cap=$2
    shift 2
    local t
    t=$(left)
    ((cap < t)) && t=$cap
    if ((t < 20)); then
        echo "SKIP  $name: out of time" | tee -a "$OUT/summary.txt"
        failed+=("$name")
        return 1
    fi
    echo "RUN   $name (limit ${t}s): $*" | tee -a "$OUT/summary.txt"
    local t0=$SECONDS rc=0 pid
    # Own process group, killed whole afterwards: no leftover of a step (pytest-xdist workers after a
    # timeout, say) may run on into the next step's timings.
    setsid -w timeout --signal=INT --kill-after=15 "$t" "$@" >"$OUT/$name.log" 2>&1 &
    pid=$!
    wait "$pid" || rc=$?
    kill -KILL -- -"$pid" 2>/dev/null || true
    echo "DONE  $name rc=$rc in $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
    ((rc == 0)) || failed+=("$name")
    return $rc
}

# Wheels carried to a machine without network go on PYTHONPATH (repo-root .whl/, git-ignored: e.g. the
# test extras diffusers and open_clip_torch, see README). Where pytest-xdist is installed (our lent GPU
# machines have it), the CUDA tests run in 8 processes: most of their time on a fresh machine is Triton
# compiling kernels, one CPU core per compile.
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/df_wheels .whl/*.whl &&
        export PYTHONPATH=/tmp/df_wheels${PYTHONPATH:+:$PYTHONPATH}
fi
XDIST=()
$PY -c 'import xdist' 2>/dev/null && XDIST=(-n "$(($(nproc) < 16 ? $(nproc) : 16))")
# pytest-xdist >= 3.2: idle workers take tests queued on busy ones (the Triton dwconv tests run 30-80 s each).
$PY -c 'import sys, xdist; sys.exit(tuple(map(int, xdist.__version__.split(".")[:2])) < (3, 2))' 2>/dev/null &&
    XDIST+=(--dist worksteal)

# want STEP: whether STEPS names it.
want() { [[ " ${STEPS:-machine build env_info tests benches} " == *" $1 "* ]]; }

: >"$OUT/summary.txt"
want machine && step machine 60 bash -c "nvidia-smi; $PY -c 'import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())'; nvcc --version || echo 'nvcc not on PATH'"

ARCH=$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>>"$OUT/summary.txt")
echo "TORCH_CUDA_ARCH_LIST=${ARCH:-unknown}" | tee -a "$OUT/summary.txt"
export MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=${ARCH:-9.0}
# Each build line gets the seconds since the build began (ninja's "[k/N]" lines mark a file done): the
# build's critical path, where the machine's minutes go.
want build && step build "${BUILD_CAP_S:-300}" bash -o pipefail -c "$PY -m pip install --no-build-isolation \
    --no-deps --no-index -v -e . 2>&1 | while IFS= read -r l; do echo \"\$SECONDS \$l\"; done"
want env_info && step env_info 60 $PY -c 'import json, diffusion_fast; print(json.dumps(diffusion_fast.env_info(), indent=1))'
# The CUDA suite (every backend and dtype on the GPU); the CPU suite is CI's job.
# The op tests first (the models' build on them), the slowest 30 listed to size later runs.
# shellcheck disable=SC2086  # TESTS is split into words on purpose
want tests && step tests "${TEST_CAP_S:-240}" $PY -m pytest ${TESTS:-tests/ops tests} -m cuda -q -rs \
    -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"} --durations=30 --junitxml="$OUT/pytest.xml"

# What else runs before each timed step (the 2026-11-27b benches started at load average 22 after the tests,
# and their wall-clock medians scattered 2x): the load and the busiest processes, in the summary.
busy() { echo "load: $(cut -d' ' -f1-3 /proc/loadavg); busiest: $(ps -eo pcpu=,comm= --sort=-pcpu | head -3 | tr -s ' \n' ' ')" >>"$OUT/summary.txt"; }

benches=()
if want benches; then
    if [[ -n ${BENCHES:-} ]]; then
        read -r -a benches <<<"$BENCHES"
    else
        for f in benchmarks/bench_*.py; do benches+=("$(basename "$f" .py)"); done
    fi
fi
probes=()
if want probes; then
    if [[ -n ${PROBES:-} ]]; then read -r -a probes <<<"$PROBES"; else probes=(benchmarks/probes/*_probe.py benchmarks/probes/*_sweep.py); fi
fi
reserve=$((${#probes[@]} * ${PROBE_CAP_S:-180}))  # seconds the benches leave to the probes
weight_of() { local w=${1#*:}; if [[ $1 == *:* ]]; then echo "${w%%:*}"; else echo 1; fi; }
args_of() { local a=${1#*:*:}; if [[ $1 == *:*:* ]]; then echo "${a//:/ }"; fi; }
weights=0
for b in ${benches[@]+"${benches[@]}"}; do weights=$((weights + $(weight_of "$b"))); done
for b in ${benches[@]+"${benches[@]}"}; do
    name=${b%%:*} && name=bench_${name#bench_}
    weight=$(weight_of "$b")
    share=$((($(left) - reserve) * weight / weights))  # this bench's share of the time left
    weights=$((weights - weight))
    # --budget-s: stop starting cases with time to spare to write the results.
    read -r -a extra <<<"$(args_of "$b")"
    busy
    step "$name" "$share" $PY "benchmarks/$name.py" --device cuda --out "$OUT" --budget-s $((share * 3 / 4)) \
        ${extra[@]+"${extra[@]}"}
done

# Probes (benchmarks/probes/, not in the default STEPS): each builds and times its own experiment.
for f in ${probes[@]+"${probes[@]}"}; do
    step "$(basename "$f" .py)" "${PROBE_CAP_S:-180}" $PY "$f" --out "$OUT"
done

echo "total ${SECONDS}s; failed: ${failed[*]:-none}" | tee -a "$OUT/summary.txt"
((${#failed[@]} == 0))
