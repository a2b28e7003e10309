"""`python benchmarks/bench.py ann`: approximate indexes (FAISS IVF, HNSW) against exact.

On one synthetic catalogue (N x D float32; `--data clustered`: points around `--clusters`
Gaussian centres, queries drawn the same way; `--data random`: i.i.d. normal), it builds
each kind with `twotower_jax.ann.build` (build seconds), then for each setting of the curve
(`--nprobe` for IVF, `--ef_search` for HNSW) times `search` over `--num_queries` queries in
batches of `--batch` (queries/s, median over `--repeats`) and measures recall@k against the
exact index (`index.BruteForceIndex`, the reference, timed the same way). --out writes the
figures as JSON. Numbers: BENCHMARKS.md ("Approximate index").
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from twotower_jax import ann


def catalogue(n: int, d: int, kind: str, clusters: int, num_q: int, seed: int):
  """(candidates [N, D], queries [Q, D]) float32, generated in chunks to bound memory."""
  rng = np.random.default_rng(seed)
  if kind == "random":
    return (rng.standard_normal((n, d), np.float32),
            rng.standard_normal((num_q, d), np.float32))
  centres = rng.standard_normal((clusters, d)).astype(np.float32)
  out = np.empty((n, d), np.float32)
  for start in range(0, n, 1 << 20):
    m = min(1 << 20, n - start)
    out[start:start + m] = centres[rng.integers(0, clusters, m)] + 0.5 * rng.standard_normal(
        (m, d), np.float32)
  q = centres[rng.integers(0, clusters, num_q)] + 0.5 * rng.standard_normal((num_q, d),
                                                                           np.float32)
  return out, q.astype(np.float32)


def _timed_search(idx, q, k, batch, repeats):
  """(ids [Q, k], median seconds for all queries)."""
  times, ids = [], None
  for r in range(repeats + 1):  # the first pass warms up (compiles the exact index)
    t0 = time.perf_counter()
    parts = [idx.search(q[s:s + batch], k)[1] for s in range(0, len(q), batch)]
    if r:
      times.append(time.perf_counter() - t0)
    ids = np.concatenate(parts)
  return ids, float(np.median(times))


def recall(got, want) -> float:
  hits = [np.intersect1d(g[g >= 0], w[w >= 0]).size / max(1, (w >= 0).sum())
          for g, w in zip(got, want)]
  return float(np.mean(hits))


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog="python benchmarks/bench.py ann", description=__doc__)
  p.add_argument("--n", type=int, default=1_000_000)
  p.add_argument("--d", type=int, default=32)
  p.add_argument("--data", choices=["clustered", "random"], default="clustered")
  p.add_argument("--clusters", type=int, default=1000)
  p.add_argument("--num_queries", type=int, default=1000)
  p.add_argument("--batch", type=int, default=1000, help="queries per search call")
  p.add_argument("--k", type=int, default=100)
  p.add_argument("--kinds", default="faiss_ivf,faiss_hnsw")
  p.add_argument("--ivf_nlist", type=int, default=0, help="0: ann.auto_nlist(N)")
  p.add_argument("--nprobe", default="4,8,16,32,64,128")
  p.add_argument("--hnsw_m", type=int, default=32)
  p.add_argument("--hnsw_ef_construction", type=int, default=64)
  p.add_argument("--ef_search", default="100,128,256,512")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--threads", type=int, default=2, help="FAISS OpenMP threads")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None)
  a = p.parse_args(argv)
  faiss = ann.faiss_module()
  faiss.omp_set_num_threads(a.threads)
  load_start = os.getloadavg()[0]
  t0 = time.perf_counter()
  c, q = catalogue(a.n, a.d, a.data, a.clusters, a.num_queries, a.seed)
  print(f"{a.n:,} x {a.d} {a.data} candidates, {a.num_queries} queries, k={a.k} "
        f"(generated in {time.perf_counter() - t0:.1f} s); load avg {load_start:.1f}")

  t0 = time.perf_counter()
  exact = ann.build("exact", c)
  exact_ids, exact_s = _timed_search(exact, q, a.k, a.batch, a.repeats)
  exact_qps = a.num_queries / exact_s
  print(f"exact       {exact_qps:>10,.0f} queries/s (reference)")
  report = {"command": "python benchmarks/bench.py ann " + " ".join(argv), "config": vars(a),
            "exact": {"queries_per_s": exact_qps, "seconds": exact_s}, "kinds": {}}
  for kind in [k for k in a.kinds.split(",") if k]:
    opts = {"ivf_nlist": a.ivf_nlist, "hnsw_m": a.hnsw_m,
            "hnsw_ef_construction": a.hnsw_ef_construction}
    t0 = time.perf_counter()
    idx = ann.build(kind, c, opts)
    build_s = time.perf_counter() - t0
    print(f"{kind}: built in {build_s:.1f} s, options {idx.options}")
    key = "ivf_nprobe" if kind == "faiss_ivf" else "hnsw_ef_search"
    values = a.nprobe if kind == "faiss_ivf" else a.ef_search
    curve = []
    for v in [int(x) for x in values.split(",") if x]:
      idx.options[key] = v
      ids, s = _timed_search(idx, q, a.k, a.batch, a.repeats)
      row = {key: v, "recall_at_k": recall(ids, exact_ids), "queries_per_s": a.num_queries / s,
             "speedup_vs_exact": exact_s / s}
      curve.append(row)
      print(f"  {key}={v:<5} recall@{a.k} {row['recall_at_k']:.4f}  "
            f"{row['queries_per_s']:>10,.0f} queries/s  {row['speedup_vs_exact']:6.1f}x exact")
    report["kinds"][kind] = {"build_seconds": build_s, "options": dict(idx.options),
                             "curve": curve}
    del idx
  report["load_avg_1m"] = {"start": load_start, "end": os.getloadavg()[0]}
  print(f"load avg {load_start:.1f} -> {os.getloadavg()[0]:.1f}")
  if a.out:
    with open(a.out, "w") as f:
      json.dump(report, f, indent=2)
    print(f"wrote {a.out}")
  return 0
