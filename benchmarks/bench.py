"""Benchmarks: `python benchmarks/bench.py <subcommand> [--flags]`.

Subcommands live in `SUBCOMMANDS` (name -> function taking the remaining argv;
an int it returns is the exit code, anything else means 0); add new ones there.

`index` compares, in one run on the same data and device:
  exact       `index.exact_top_k` (block maxima + rescoring; never sorts all scores)
  lax_top_k   `jax.lax.top_k` on materialised scores (all at once when they fit
              in --max_score_gib, else chunked with a running top-k merge)
  matmul_max  every score computed and reduced by max only: the upper bound for
              any exact method
  faiss_flat  `faiss.IndexFlatIP` with --faiss_threads threads (if faiss is installed)
Warm-up (compilation) is excluded; each repeat times all --num_batches query
batches per method, methods interleaved; figures are medians over repeats. It
prints the device and jax version, queries/s, XLA's temp-buffer size per method
(`compiled.memory_analysis()`), the process peak RSS (and the device's peak bytes
on accelerators), and how far the methods' result ids agree; --out=PATH writes all
of it as JSON. Numbers: BENCHMARKS.md ("Exact top-k index").

`ann` (benchmarks/bench_ann.py) measures the approximate kinds of `twotower_jax.ann`
(FAISS IVF, HNSW): build time, recall@k against the exact index and queries/s over a curve
of nprobe / efSearch. Numbers: BENCHMARKS.md ("Approximate index").
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax import lax

from twotower_jax import index as index_lib

PRECISIONS = {
  "highest": lax.Precision.HIGHEST,  # true float32 everywhere
  "high": lax.Precision.HIGH,
  "default": lax.Precision.DEFAULT,  # TF32 on recent NVIDIA GPUs
}


def _dot(q_BxD, c_NxD, precision):
  return lax.dot_general(
    q_BxD,
    c_NxD.astype(jnp.float32),
    (((1,), (1,)), ((), ())),
    precision=precision,
    preferred_element_type=jnp.float32,
  )


def _scan_chunks(q_BxD, c_NxD, chunk, init, step, precision):
  """Folds `step(carry, scores_BxC, first_index)` over candidate chunks (+ the tail)."""
  n = c_NxD.shape[0]
  n_full = n // chunk
  carry = init
  if n_full:

    def body(carry, i):
      c = lax.dynamic_slice_in_dim(c_NxD, i * chunk, chunk)
      return step(carry, _dot(q_BxD, c, precision), i * chunk), None

    carry, _ = lax.scan(body, carry, jnp.arange(n_full, dtype=jnp.int32))
  if n - n_full * chunk:
    carry = step(carry, _dot(q_BxD, c_NxD[n_full * chunk :], precision), n_full * chunk)
  return carry


@functools.partial(jax.jit, static_argnames=("k", "chunk", "precision"))
def lax_top_k_baseline(
  q_BxD, c_NxD, *, k: int, chunk: int | None = None, precision=lax.Precision.HIGHEST
):
  """`lax.top_k` over all scores, or per chunk merged into a running top-k."""
  if chunk is None or chunk >= c_NxD.shape[0]:
    return lax.top_k(_dot(q_BxD, c_NxD, precision), k)
  num_q = q_BxD.shape[0]

  def step(carry, s_BxC, first):
    v, i = carry
    cv, ci = lax.top_k(s_BxC, min(k, s_BxC.shape[1]))
    # Running results first: on ties they hold the smaller indices.
    mv, pos = lax.top_k(jnp.concatenate([v, cv], axis=1), k)
    mi = jnp.take_along_axis(jnp.concatenate([i, ci + first], axis=1), pos, axis=1)
    return mv, mi

  init = (jnp.full((num_q, k), -jnp.inf, jnp.float32), jnp.full((num_q, k), -1, jnp.int32))
  return _scan_chunks(q_BxD, c_NxD, chunk, init, step, precision)


@functools.partial(jax.jit, static_argnames=("chunk", "precision"))
def matmul_max(q_BxD, c_NxD, *, chunk: int, precision=lax.Precision.HIGHEST):
  """Max score per query, all scores computed chunk by chunk (nothing selected)."""
  init = jnp.full((q_BxD.shape[0],), -jnp.inf, jnp.float32)
  return _scan_chunks(
    q_BxD, c_NxD, chunk, init, lambda m, s, _: jnp.maximum(m, s.max(axis=1)), precision
  )


def _memory_budget_bytes() -> int:
  dev = jax.devices()[0]
  stats = dev.memory_stats() if dev.platform != "cpu" else None
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"])
  return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _xla_memory(fn, *args) -> dict[str, int] | None:
  """XLA's buffer assignment for `fn(*args)`: temp, argument and output bytes."""
  try:
    m = fn.lower(*args).compile().memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend reports it
    return None
  if m is None:
    return None
  return {
    "temp_bytes": int(m.temp_size_in_bytes),
    "argument_bytes": int(m.argument_size_in_bytes),
    "output_bytes": int(m.output_size_in_bytes),
  }


def _environment() -> dict:
  dev = jax.devices()[0]
  env = {
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "numpy": np.__version__,
    "backend": jax.default_backend(),
    "device": f"{dev.platform}: {dev.device_kind}",
    "num_devices": jax.device_count(),
    "cpu_count": os.cpu_count(),
    "cpu": platform.processor() or platform.machine(),
    "python": platform.python_version(),
    "load_avg_1m_start": os.getloadavg()[0],
  }
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    if names:
      env["cpu"] = names[0]
  except OSError:
    pass
  return env


def _compare(a_ids, b_ids) -> dict[str, float]:
  """Agreement of two [B, k] id arrays: identical rows, identical positions, set overlap."""
  a, b = np.asarray(a_ids), np.asarray(b_ids)
  overlap = np.mean([np.intersect1d(x, y).size / max(1, x.size) for x, y in zip(a, b)])
  return {
    "rows_identical": float(np.mean(np.all(a == b, axis=1))),
    "positions_identical": float(np.mean(a == b)),
    "set_overlap": float(overlap),
  }


def bench_index(argv: list[str]) -> int:
  p = argparse.ArgumentParser(
    prog="python benchmarks/bench.py index",
    description="Queries/s of exact top-k retrieval vs lax.top_k, matmul+max and FAISS.",
  )
  p.add_argument("--n", type=int, default=1_000_000, help="candidates")
  p.add_argument("--d", type=int, default=32, help="embedding dim")
  p.add_argument("--batch", type=int, default=1024, help="queries per batch")
  p.add_argument("--k", type=int, default=100)
  p.add_argument(
    "--dtype",
    choices=["float32", "bfloat16"],
    default="float32",
    help="candidate dtype (queries are float32)",
  )
  p.add_argument("--num_batches", type=int, default=2, help="query batches per repeat")
  p.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
  p.add_argument(
    "--methods",
    default=None,
    help="comma-separated subset of exact,lax_top_k,matmul_max,faiss_flat "
    "(default: all on CPU; all but faiss_flat, a CPU library, elsewhere)",
  )
  p.add_argument(
    "--precision",
    choices=sorted(PRECISIONS),
    default="highest",
    help="matmul precision of every JAX method (highest = true float32)",
  )
  p.add_argument("--chunk_size", type=int, default=None, help="exact_top_k chunk_size")
  p.add_argument("--block_size", type=int, default=None, help="exact_top_k block_size")
  p.add_argument("--tile_size", type=int, default=None, help="exact_top_k tile_size")
  p.add_argument(
    "--max_score_gib",
    type=float,
    default=None,
    help="largest score matrix lax_top_k may materialise (default: 1/4 of "
    "host memory on CPU, 1/16 of device memory elsewhere, leaving room "
    "for the sort behind top_k); above it, it runs chunked",
  )
  p.add_argument("--faiss_threads", type=int, default=2)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="write the figures as JSON here")
  a = p.parse_args(argv)

  on_cpu = jax.default_backend() == "cpu"
  if a.methods is None:
    a.methods = "exact,lax_top_k,matmul_max" + (",faiss_flat" if on_cpu else "")
  methods = [m for m in a.methods.split(",") if m]
  precision = PRECISIONS[a.precision]
  unknown = set(methods) - {"exact", "lax_top_k", "matmul_max", "faiss_flat"}
  if unknown:
    p.error(f"unknown methods {sorted(unknown)}")
  faiss = None
  if "faiss_flat" in methods:
    try:
      import faiss
    except ImportError:
      print("faiss not installed (pip install 'twotower_jax[faiss]'): skipping faiss_flat")
      methods.remove("faiss_flat")

  env = _environment()
  print(f"jax {env['jax']} | device {env['device']} | {env['cpu_count']} CPUs ({env['cpu']})")
  key_c, key_q = jax.random.split(jax.random.PRNGKey(a.seed))
  dtype = jnp.dtype(a.dtype)
  c = jax.random.normal(key_c, (a.n, a.d), jnp.float32).astype(dtype)
  qs = list(jax.random.normal(key_q, (a.num_batches, a.batch, a.d), jnp.float32))
  jax.block_until_ready((c, qs))

  budget = _memory_budget_bytes()
  max_scores = int(a.max_score_gib * 2**30) if a.max_score_gib else budget // (4 if on_cpu else 16)
  score_bytes = a.batch * a.n * 4
  lax_chunk = None
  if score_bytes > max_scores:
    lax_chunk = max(a.k, max_scores // (a.batch * 4) // 1024 * 1024)
  mm_chunk = index_lib.default_sizes()["tile"]
  exact_kw = {"chunk_size": a.chunk_size, "block_size": a.block_size, "tile_size": a.tile_size}
  exact_fn = jax.jit(
    functools.partial(index_lib.exact_top_k, k=a.k, precision=precision, **exact_kw)
  )

  runners: dict[str, Callable[[int], object]] = {}  # batch number -> results
  memory: dict[str, dict | None] = {}
  if "exact" in methods:
    runners["exact"] = lambda i: exact_fn(qs[i], c)
    memory["exact"] = _xla_memory(exact_fn, qs[0], c)
  if "lax_top_k" in methods:
    lax_fn = jax.jit(
      functools.partial(lax_top_k_baseline, k=a.k, chunk=lax_chunk, precision=precision)
    )
    runners["lax_top_k"] = lambda i: lax_fn(qs[i], c)
    memory["lax_top_k"] = _xla_memory(lax_fn, qs[0], c)
  if "matmul_max" in methods:
    mm_fn = jax.jit(functools.partial(matmul_max, chunk=mm_chunk, precision=precision))
    runners["matmul_max"] = lambda i: mm_fn(qs[i], c)
    memory["matmul_max"] = _xla_memory(mm_fn, qs[0], c)
  if "faiss_flat" in methods:
    faiss.omp_set_num_threads(a.faiss_threads)
    fi = faiss.IndexFlatIP(a.d)
    fi.add(np.ascontiguousarray(np.asarray(c.astype(jnp.float32))))
    qs_np = [np.ascontiguousarray(np.asarray(q)) for q in qs]
    runners["faiss_flat"] = lambda i: fi.search(qs_np[i], a.k)
    memory["faiss_flat"] = None

  # Warm-up: compile and run every method once on every batch; keep results.
  batches = range(a.num_batches)
  results = {m: [jax.block_until_ready(f(i)) for i in batches] for m, f in runners.items()}
  times: dict[str, list[float]] = {m: [] for m in runners}
  for _ in range(a.repeats):
    for m, f in runners.items():
      t0 = time.perf_counter()
      for i in batches:
        jax.block_until_ready(f(i))
      times[m].append(time.perf_counter() - t0)

  n_queries = a.batch * a.num_batches
  figures = {}
  for m, ts in times.items():
    med = float(np.median(ts))
    figures[m] = {
      "queries_per_s": n_queries / med,
      "seconds_per_batch_median": med / a.num_batches,
      "seconds_per_repeat": ts,
      "xla_memory": memory.get(m),
    }
  if "lax_top_k" in figures:
    figures["lax_top_k"]["mode"] = "full" if lax_chunk is None else f"chunked({lax_chunk})"
  if "matmul_max" in figures:
    figures["matmul_max"]["mode"] = f"chunked({mm_chunk})"

  checks = {}
  if "exact" in results:
    ex_ids = np.concatenate([np.asarray(r[1]) for r in results["exact"]])
    ex_v = np.concatenate([np.asarray(r[0]) for r in results["exact"]])
    if "lax_top_k" in results:
      ids = np.concatenate([np.asarray(r[1]) for r in results["lax_top_k"]])
      v = np.concatenate([np.asarray(r[0]) for r in results["lax_top_k"]])
      checks["exact_vs_lax_top_k"] = _compare(ex_ids, ids) | {
        "max_abs_score_diff": float(np.max(np.abs(ex_v - v)))
      }
    if "faiss_flat" in results:
      ids = np.concatenate([r[1] for r in results["faiss_flat"]])
      checks["exact_vs_faiss_flat"] = _compare(ex_ids, ids)
    if "matmul_max" in results:
      mx = np.concatenate([np.asarray(r) for r in results["matmul_max"]])
      checks["exact_top1_vs_matmul_max"] = {"max_abs_diff": float(np.max(np.abs(ex_v[:, 0] - mx)))}

  env["load_avg_1m_end"] = os.getloadavg()[0]
  peak = {"process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
  dev = jax.devices()[0]
  if dev.platform != "cpu" and dev.memory_stats():
    peak["device_peak_bytes_in_use"] = int(dev.memory_stats().get("peak_bytes_in_use", 0))

  report = {
    "command": "python benchmarks/bench.py index " + " ".join(argv),
    "config": vars(a)
    | {
      "lax_top_k_chunk": lax_chunk,
      "matmul_max_chunk": mm_chunk,
      "exact_sizes": {k: v for k, v in exact_kw.items() if v} or index_lib.default_sizes(),
    },
    "environment": env,
    "figures": figures,
    "checks": checks,
    "peak_memory": peak,
  }
  _print_report(report)
  if a.out:
    with open(a.out, "w") as f:
      json.dump(report, f, indent=2)
    print(f"wrote {a.out}")
  return 0


def _gib(x: int | None) -> str:
  return "-" if x is None else f"{x / 2**30:.2f}"


def _print_report(r: dict) -> None:
  cfg, env = r["config"], r["environment"]
  print(
    f"{cfg['n']:,} x {cfg['d']} {cfg['dtype']} candidates, batches of {cfg['batch']:,}, "
    f"k={cfg['k']}, {cfg['num_batches']} batches x {cfg['repeats']} repeats; "
    f"load avg {env['load_avg_1m_start']:.1f} -> {env['load_avg_1m_end']:.1f}"
  )
  base = r["figures"].get("lax_top_k", {}).get("queries_per_s")
  print(f"{'method':<12} {'queries/s':>10} {'vs lax':>7} {'s/batch':>8} {'XLA temp GiB':>12}  mode")
  for m, f in r["figures"].items():
    mem = f["xla_memory"]
    rel = f"{f['queries_per_s'] / base:.2f}x" if base else "-"
    print(
      f"{m:<12} {f['queries_per_s']:>10,.0f} {rel:>7} "
      f"{f['seconds_per_batch_median']:>8.3f} {_gib(mem and mem['temp_bytes']):>12}  "
      f"{f.get('mode', '')}"
    )
  for name, c in r["checks"].items():
    print(f"check {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in c.items()))
  print(
    "peak memory: "
    + ", ".join(f"{k}={_gib(v)} GiB" for k, v in r["peak_memory"].items())
    + " (XLA temp = compiled.memory_analysis().temp_size_in_bytes; RSS = getrusage)"
  )


def bench_ann(argv: list[str]) -> object:
  import bench_ann as ba  # pylint: disable=g-import-not-at-top  # beside this file
  return ba.main(argv)


def bench_train(argv: list[str]) -> object:
  import bench_train as bt  # pylint: disable=g-import-not-at-top  # beside this file
  return bt.main(argv)


SUBCOMMANDS: dict[str, Callable[[list[str]], object]] = {
  "index": bench_index,
  "ann": bench_ann,
  "train": bench_train,
}


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] not in SUBCOMMANDS:
    names = ", ".join(SUBCOMMANDS)
    print(f"usage: python benchmarks/bench.py {{{names}}} [--flags]  (--help per subcommand)")
    return 2
  rc = SUBCOMMANDS[argv[0]](argv[1:])
  return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
  sys.exit(main())
