#!/usr/bin/env bash
# Second call on the warm machine: probes, then benches with explicit options. Output in /tmp/g2.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
O=/tmp/g2; mkdir -p $O
t0=$SECONDS
r() { local name=$1 cap=$2; shift 2; echo "RUN $name cap=$cap at $((SECONDS-t0))s" | tee -a $O/summary.txt
  timeout --signal=INT --kill-after=10 $cap "$@" > $O/$name.log 2>&1; echo "DONE $name rc=$? at $((SECONDS-t0))s" | tee -a $O/summary.txt; }
r gns_sweep 75 python3 benchmarks/probes/group_norm_silu_sweep.py --out $O/gns --values 4,8,16 --quick
r dwconv_probe 85 python3 benchmarks/probes/dwconv_tiled_probe.py --out $O/dw --no-compile --reps 20
r bench_group_norm_silu 55 python3 benchmarks/bench_group_norm_silu.py --device cuda --out $O --budget-s 40
r bench_ddpm 100 python3 benchmarks/bench_ddpm.py --device cuda --out $O --dtypes bf16 --budget-s 72
r bench_nvae_cell 45 python3 benchmarks/bench_nvae_cell.py --device cuda --out $O --budget-s 32
echo total $((SECONDS-t0))s | tee -a $O/summary.txt
