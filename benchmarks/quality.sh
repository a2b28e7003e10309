#!/usr/bin/env bash
# Retrieval quality over 3 seeds for each config and split, then one report (table + plot).
#   TWOTOWER_DATA_DIR=../shared/data/ml-100k benchmarks/quality.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/quality}"
mkdir -p "$out"
dirs=()
run() {  # name config[:arg] seed [flags...]
  local name="$1" cfg="$2" seed="$3"; shift 3
  local dir="$out/$name-s$seed"
  [ -f "$dir/metrics.json" ] || python -m twotower_jax.main --config "$cfg" --workdir "$dir" \
    --config.seed="$seed" --config.train.progress=False "$@" > "$dir.log" 2>&1
  dirs+=("$dir")
}
for seed in 0 1 2; do
  run seed-seedsplit configs/seed.py "$seed"
  run seed-random configs/seed.py "$seed" --config.data.split=random
  run demographic-random configs/demographic.py "$seed"
  run demographic-temporal configs/demographic.py "$seed" --config.data.split=temporal \
    --config.data.test_fraction=0.1
  run default-random configs/default.py "$seed"
done
python -m twotower_jax.main --mode=report --workdir "$out/report" \
  --report_dirs="$(IFS=,; echo "${dirs[*]}")"
