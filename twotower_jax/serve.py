r"""The HTTP service's command line: one uvicorn worker (uvloop, httptools) over a workdir.

  python -m twotower_jax.serve --workdir runs/default [--host 127.0.0.1 --port 8000] \
      [--max_batch 64 --max_wait_ms 2 --fill_wait 0.5 --nobatching --watch_s 2]

``--workdir`` is a training workdir (its ``serving/`` is served) or a serving directory.
The routes are described in ``service.py``; ``GET /`` is a page for people.
"""

from __future__ import annotations

import logging
import sys

from absl import app
from absl import flags

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir, or its serving/ directory.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on (0: any free port).", lower_bound=0)
_MAX_BATCH = flags.DEFINE_integer("max_batch", 64, "Most requests per batch.", lower_bound=1)
_MAX_WAIT_MS = flags.DEFINE_float("max_wait_ms", 2.0, "Longest wait for a batch to fill, while "
                                  "more requests are arriving (ms).", lower_bound=0.0)
_FILL_WAIT = flags.DEFINE_float("fill_wait", 0.0, "With no request on its way, still wait this "
                                 "fraction of the last batch's time for the batch to fill "
                                 "(0 to 1; e.g. 0.5 for a large catalogue, where a batch costs "
                                 "the same whatever its size).", lower_bound=0.0,
                                 upper_bound=1.0)
_BATCHING = flags.DEFINE_boolean("batching", True, "Gather concurrent requests into batches "
                                 "(--nobatching: one request at a time).")
_WATCH_S = flags.DEFINE_float("watch_s", 0.0, "If > 0, check the serving directory every this "
                              "many seconds and reload it when it changed.", lower_bound=0.0)
_LOG_LEVEL = flags.DEFINE_enum("log_level", "warning", ["debug", "info", "warning", "error"],
                               "uvicorn's log level (access lines at info).")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}.")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required: a training workdir or a serving directory.")
  import uvicorn  # pylint: disable=g-import-not-at-top
  from twotower_jax import serving  # pylint: disable=g-import-not-at-top
  from twotower_jax import service  # pylint: disable=g-import-not-at-top
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  # serving's per-query info lines (e.g. "served through the out-of-vocabulary index") would
  # be one per batch under load; warnings still show.
  logging.getLogger(serving.__name__).setLevel(logging.WARNING)
  # The batch worker thread and the event loop hand the GIL to each other often; Python's
  # default 5 ms switch interval made requests wait for it (p99 at 16 connections: 125 ms,
  # against 17 ms with 0.5 ms; BENCHMARKS.md, "HTTP service").
  sys.setswitchinterval(0.0005)
  try:
    api = service.create_app(_WORKDIR.value, max_batch=_MAX_BATCH.value,
                             max_wait_ms=_MAX_WAIT_MS.value, fill_wait=_FILL_WAIT.value,
                             batching_on=_BATCHING.value,
                             watch_s=_WATCH_S.value)
  except serving.ServingError as e:
    raise app.UsageError(str(e)) from e
  uvicorn.run(api, host=_HOST.value, port=_PORT.value, loop="uvloop", http="httptools",
              workers=1, log_level=_LOG_LEVEL.value, access_log=_LOG_LEVEL.value == "debug")


if __name__ == "__main__":
  app.run(main)
