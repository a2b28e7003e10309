#!/usr/bin/env bash
# GPU figures in one go (index at 10M x 32, training throughput), written to $OUT (or ./gpu_out).
# Run from the repository root on a machine with JAX for CUDA; carry ml_collections and
# tensorboardX wheels in .whl/ if they are not installed there.
set -uo pipefail
out="${OUT:-gpu_out}"; mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/device.txt"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$out/device.txt"
python3 -c "
import sys; sys.path.insert(0, 'tests')
from conftest import write_synthetic_ml100k
write_synthetic_ml100k('/tmp/ml', num_users=943, num_movies=1682, num_ratings=100000, seed=0)"
timeout 100 python3 benchmarks/bench.py train --config=configs/seed.py --batch_sizes=2048,8192 \
  --epochs=3 --set data.dir=/tmp/ml --set data.download=False --out="$out/train_gpu_seed.json" \
  2>&1 | grep -v -i warn | tail -3
timeout 180 python3 benchmarks/bench.py train --config=configs/seed.py --batch_sizes=8192 \
  --epochs=1 --set data.source=synthetic --set data.synthetic_items=1000000 \
  --set data.synthetic_interactions=10000000 --set data.synthetic_users=200000 \
  --set data.split=random --feature query.age=none --feature query.gender=none \
  --feature query.occupation=none --feature "query.user_id=id('user_id', dim=32)" \
  --compare optimizer.sparse_embeddings=True \
  --out="$out/train_gpu_1m.json" 2>&1 | grep -v -i warn | tail -3
for p in "--precision=default" "--dtype=bfloat16 --precision=default"; do
  tag=$(echo "$p" | tr -cd 'a-z0-9')
  timeout 90 python3 benchmarks/bench.py index --n=10000000 --batch=4096 --k=100 $p \
    --methods=exact,matmul_max --out="$out/index_gpu_$tag.json" 2>&1 | tail -9
done
