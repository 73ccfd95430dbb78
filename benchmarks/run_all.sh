#!/bin/sh
# Full-mode run of every benchmark, one after another (logs in benchmarks/results/*.log).
cd "$(dirname "$0")/.." || exit 1
uptime > benchmarks/results/load.txt
for b in step_cost guard_cost end_to_end compile_health memory parallel fidelity peers scaling prune_forms cold_start; do
  start=$(date +%s)
  python benchmarks/$b.py > benchmarks/results/$b.log 2>&1
  echo "$b rc=$? $(( $(date +%s) - start )) s; $(uptime)" >> benchmarks/results/load.txt
done
