r"""Load test of the HTTP service with wrk: requests/s, p50/p99 latency, non-2xx responses.

It trains nothing: give it a trained workdir. For each served setup it starts the server
on 127.0.0.1 (a free port), waits for /healthz, runs ``wrk`` (``benchmarks/recommend.lua``:
POST /recommend for known users in turn, ``exclude_rated``) for a fixed duration at each
connection count, and stops the server. Setups, in one run:

  bare       the reference: a bare Starlette + uvicorn app (uvloop, httptools) that
             parses the same JSON POST and answers with a numpy top-10 over 1,682 x 32
  batching   python -m twotower_jax.serve --workdir W
  nobatching the same with --nobatching
  1M exact   (--large_items N > 0) W's serving directory with its catalogue replaced by N
             synthetic items (seeded normal embeddings of the same dimension, titles
             "Item i", one genre each), written to --large_dir; the query tower, users and
             their training items are W's, so the same requests apply. Served with the
             exact index, batching on (waiting for batches to fill: --max_wait_ms 50
             --fill_wait 0.5) and off. The synthetic embeddings are clustered (1,000
             Gaussian centres, noise half their spread).
  large_ivf  (setup "large_ivf") the same catalogue with a FAISS IVF index (--ivf_nprobe).

  python benchmarks/load_test.py --workdir /tmp/serve_default [--duration 5] \
      [--connections 1,16,64] [--large_items 1000000]

Prints a table and writes benchmarks/results/http_load_cpu.json (``--out``). Server and wrk
share the machine's cores (wrk -t1); the server's CPU time per request is reported too, as
it depends less on what else runs on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
from absl import app
from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[1]
LUA = REPO / "benchmarks" / "recommend.lua"

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained workdir (its serving/ is served).")
_DURATION = flags.DEFINE_integer("duration", 5, "Seconds of load per measurement.")
_CONNECTIONS = flags.DEFINE_list("connections", ["1", "16", "64"], "wrk connection counts.")
_SETUPS = flags.DEFINE_list("setups", ["bare", "batching", "nobatching", "large",
                                       "large_nobatching"], "What to measure.")
_LARGE_ITEMS = flags.DEFINE_integer("large_items", 1_000_000, "Items of the synthetic "
                                    "catalogue (0: skip it).")
_LARGE_DIR = flags.DEFINE_string("large_dir", "/tmp/twotower_large_serving",
                                 "Where the synthetic catalogue's serving directory goes.")
_IVF_NPROBE = flags.DEFINE_integer("ivf_nprobe", 32, "nprobe of the large_ivf setup's IVF "
                                   "index (2,048 cells; recall@100 0.961 at 32 on the "
                                   "served users' queries, see BENCHMARKS.md).")
_OUT = flags.DEFINE_string("out", str(REPO / "benchmarks" / "results" / "http_load_cpu.json"),
                           "Where the results go (JSON).")
_SERVE_BARE = flags.DEFINE_integer("serve_bare", 0, "Internal: serve the bare app on this port.")


# ----------------------------------------------------------------------------
# The bare-stack reference.


def bare_app(num_items: int = 1682, dim: int = 32):
  """Starlette: POST /recommend parses the JSON body, scores a user's vector against
  num_items x dim embeddings with numpy and answers the top 10 (ids, scores, titles)."""
  from starlette.applications import Starlette  # pylint: disable=g-import-not-at-top
  from starlette.requests import Request  # pylint: disable=g-import-not-at-top
  from starlette.responses import JSONResponse  # pylint: disable=g-import-not-at-top
  from starlette.routing import Route  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  c_NxD = rng.normal(size=(num_items, dim)).astype(np.float32)
  u_UxD = rng.normal(size=(4096, dim)).astype(np.float32)
  titles = np.array([f"Item {i}" for i in range(num_items)])

  async def recommend(request: Request) -> JSONResponse:
    body = await request.json()
    k = int(body.get("k", 10))
    s_N = c_NxD @ u_UxD[hash(body.get("user_id")) % len(u_UxD)]
    top = np.argpartition(-s_N, k)[:k]
    top = top[np.argsort(-s_N[top], kind="stable")]
    return JSONResponse({"items": [{"item_id": int(i), "score": float(s_N[i]),
                                    "title": str(titles[i])} for i in top]})

  async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})

  return Starlette(routes=[Route("/recommend", recommend, methods=["POST"]),
                           Route("/healthz", healthz)])


# ----------------------------------------------------------------------------
# A large synthetic catalogue around a trained query tower.


def make_large_serving(src: pathlib.Path, dst: pathlib.Path, num_items: int) -> pathlib.Path:
  """``src``'s serving directory with ``num_items`` synthetic candidates (see the module)."""
  src = src / "serving" if (src / "serving").is_dir() else src
  marker = dst / f"synthetic_{num_items}.done"
  if marker.exists() and (dst / "serving.json").stat().st_mtime >= (
      src / "serving.json").stat().st_mtime:
    return dst
  shutil.rmtree(dst, ignore_errors=True)
  shutil.copytree(src, dst)
  with np.load(src / "candidates.npz") as f:
    emb, ids = f["embeddings"], f["item_id"]
  rng = np.random.default_rng(0)
  # Same scale as the trained candidates, so that scores look alike.
  scale = float(np.std(emb))
  # Clustered, as real catalogues are (and as the approximate-index benchmark uses): 1,000
  # Gaussian centres with noise of half their spread.
  centres = rng.standard_normal((1000, emb.shape[1]), dtype=np.float32)
  new = (centres[rng.integers(0, 1000, num_items)]
         + 0.5 * rng.standard_normal((num_items, emb.shape[1]), dtype=np.float32)) * scale
  new[:len(emb)] = emb  # the trained items keep their rows (users' training items)
  item_id = np.arange(1, num_items + 1, dtype=ids.dtype if ids.dtype.kind in "iu" else np.int64)
  if ids.dtype.kind in "iu":
    item_id[:len(ids)] = ids
  np.savez(dst / "candidates.npz", embeddings=new, item_id=item_id)
  genres = np.array(["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi"])
  np.savez(dst / "items.npz", movie_title=np.char.add("Item ", item_id.astype(str)),
           movie_genres=genres[np.arange(num_items) % len(genres)])
  meta = json.loads((dst / "serving.json").read_text())
  meta["title_column"] = "movie_title"
  (dst / "serving.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
  marker.touch()
  return dst


def with_ivf(src: pathlib.Path, dst: pathlib.Path, nprobe: int) -> pathlib.Path:
  """``src`` (a serving directory) with a FAISS IVF index (cells from N, ``nprobe``)."""
  from twotower_jax import ann  # pylint: disable=g-import-not-at-top
  marker = dst / f"ivf_2048_{nprobe}.done"
  if marker.exists() and marker.stat().st_mtime >= (src / "candidates.npz").stat().st_mtime:
    return dst
  shutil.rmtree(dst, ignore_errors=True)
  shutil.copytree(src, dst)
  with np.load(src / "candidates.npz") as f:
    emb = f["embeddings"]
  index = ann.build("faiss_ivf", emb, {"ivf_nlist": 2048, "ivf_nprobe": nprobe})
  meta = json.loads((dst / "serving.json").read_text())
  meta["index"] = ann.save(index, dst)
  (dst / "serving.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
  # Recall where it matters: the queries of the served users against this catalogue.
  from twotower_jax import serving  # pylint: disable=g-import-not-at-top
  rec = serving.load(dst)
  users = rec.users["user_key"][:1000].tolist()
  q_QxD = np.asarray(rec.embed(rec.queries(users, [None] * len(users))))
  _, want = rec.index.exact.search(q_QxD, 100)
  _, got = rec.index.search(q_QxD, 100)
  recall = np.mean([len(np.intersect1d(w, g)) / 100 for w, g in zip(want, got)])
  print(f"IVF recall@100 against exact on {len(users):,} served users' queries: "
        f"{recall:.3f}", flush=True)
  marker.touch()
  return dst


# ----------------------------------------------------------------------------
# Running servers and wrk.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def server(args, timeout_s: float = 300.0):
  """Starts ``python ARGS(port)`` (listening on 127.0.0.1:port, a free port), waits for
  /healthz, yields the base URL, and stops the process (SIGTERM, then SIGKILL) on exit."""
  port = _free_port()
  log = open(f"/tmp/load_test_server_{port}.log", "w")  # pylint: disable=consider-using-with
  proc = subprocess.Popen([sys.executable, *args(port)], cwd=REPO,
                          stdout=log, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}"
  try:
    deadline = time.monotonic() + timeout_s
    while True:
      if proc.poll() is not None:
        raise RuntimeError(f"The server exited ({proc.returncode}); see {log.name}.")
      try:
        with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
          if r.status == 200:
            break
      except OSError:
        pass
      if time.monotonic() > deadline:
        raise RuntimeError(f"The server did not answer /healthz in {timeout_s} s.")
      time.sleep(0.5)
    yield url, proc.pid
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    log.close()


def wrk(url: str, connections: int, duration: int, users: list) -> dict:
  """One wrk run (-t1) against POST /recommend; the Lua script's JSON summary."""
  env = dict(os.environ, WRK_USERS=",".join(map(str, users)), WRK_K="10",
             WRK_EXCLUDE_RATED="true")
  out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "5s",
                        "-s", str(LUA), url + "/"], env=env, capture_output=True, text=True,
                       timeout=duration + 60, check=True).stdout
  summary = json.loads(out.strip().splitlines()[-1])
  seconds = summary["duration_us"] / 1e6
  return {"connections": connections, "requests": summary["requests"],
          "requests_per_s": summary["requests"] / seconds,
          "p50_ms": summary["p50_us"] / 1e3, "p90_ms": summary["p90_us"] / 1e3,
          "p99_ms": summary["p99_us"] / 1e3, "max_ms": summary["max_us"] / 1e3,
          "non2xx": summary["non2xx"],
          "socket_errors": sum(summary[k] for k in ("connect_errors", "read_errors",
                                                    "write_errors", "timeouts"))}


def _cpu_s(pid: int) -> float:
  """CPU seconds (user + system) a process has used so far."""
  fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(name: str, args, users: list) -> list[dict]:
  rows = []
  with server(args) as (url, pid):
    wrk(url, 16, 1, users)  # warm the connection path
    for c in map(int, _CONNECTIONS.value):
      cpu = _cpu_s(pid)
      row = {"setup": name, **wrk(url, c, _DURATION.value, users)}
      row["server_cpu_ms_per_request"] = (_cpu_s(pid) - cpu) * 1e3 / max(row["requests"], 1)
      print(f"  {name:18s} c={c:3d}  {row['requests_per_s']:9.0f} req/s  "
            f"p50 {row['p50_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms  "
            f"cpu {row['server_cpu_ms_per_request']:.3f} ms/req  non-2xx {row['non2xx'] + row['socket_errors']}", flush=True)
      rows.append(row)
  return rows


def main(argv) -> None:
  del argv
  if _SERVE_BARE.value:
    import uvicorn  # pylint: disable=g-import-not-at-top
    uvicorn.run(bare_app(), host="127.0.0.1", port=_SERVE_BARE.value, loop="uvloop",
                http="httptools", log_level="warning", access_log=False)
    return
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required: a trained workdir (see the module doc).")
  if shutil.which("wrk") is None:
    raise app.UsageError("wrk is not installed (Debian: apt-get install wrk).")
  workdir = pathlib.Path(_WORKDIR.value)
  serving_dir = workdir / "serving" if (workdir / "serving").is_dir() else workdir
  with np.load(serving_dir / "users.npz") as f:
    users = f["user_key"][:2000].tolist()
  def serve(path, *extra):
    return lambda port: ["-m", "twotower_jax.serve", "--workdir", str(path), "--port",
                         str(port), *extra]
  setups = {"bare": lambda port: ["benchmarks/load_test.py", f"--serve_bare={port}"],
            "batching": serve(serving_dir), "nobatching": serve(serving_dir, "--nobatching")}
  if _LARGE_ITEMS.value > 0 and any(s.startswith("large") for s in _SETUPS.value):
    start = time.perf_counter()
    large = make_large_serving(serving_dir, pathlib.Path(_LARGE_DIR.value), _LARGE_ITEMS.value)
    print(f"synthetic catalogue of {_LARGE_ITEMS.value:,} items in {large} "
          f"({time.perf_counter() - start:.1f} s)", flush=True)
    # A batch over 1M items costs about the same whatever its size (the catalogue is read
    # once per batch), so the batcher waits for it to fill (serve.py --fill_wait).
    fill = ("--max_wait_ms", "50", "--fill_wait", "0.5")
    setups["large"] = serve(large, *fill)
    setups["large_nobatching"] = serve(large, "--nobatching")
    if "large_ivf" in _SETUPS.value:
      start = time.perf_counter()
      ivf = with_ivf(large, pathlib.Path(str(_LARGE_DIR.value) + "_ivf"), _IVF_NPROBE.value)
      print(f"IVF index (nprobe {_IVF_NPROBE.value}) in {ivf} "
            f"({time.perf_counter() - start:.1f} s)", flush=True)
      setups["large_ivf"] = serve(ivf, *fill)
  unknown = [s for s in _SETUPS.value if s not in setups]
  if unknown:
    raise app.UsageError(f"Unknown or skipped setups {unknown}; choose from {list(setups)}.")
  rows = []
  for name in _SETUPS.value:
    rows += measure(name, setups[name], users)
  result = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "workdir": str(workdir), "duration_s": _DURATION.value,
            "large_items": _LARGE_ITEMS.value, "cpus": os.cpu_count(), "rows": rows}
  path = pathlib.Path(_OUT.value)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=1))
  print("\n| setup | connections | requests/s | p50 ms | p99 ms | server CPU ms/request | "
        "non-2xx |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['setup']} | {r['connections']} | {r['requests_per_s']:,.0f} | "
          f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['server_cpu_ms_per_request']:.3f} | "
          f"{r['non2xx'] + r['socket_errors']} |")
  print(f"\nwrote {path}")


if __name__ == "__main__":
  app.run(main)
