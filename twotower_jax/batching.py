"""Dynamic batching: concurrent requests gathered into one call.

A :class:`Batcher` owns an asyncio queue and one worker task. ``await batcher.submit(x)``
puts ``x`` on the queue and waits for its own result. The worker takes the first waiting
item, then keeps taking items until it holds ``max_batch`` of them or ``max_wait_ms`` have
passed since the first, whichever comes first, and hands the whole list to ``process``
(run on one worker thread, so the event loop keeps reading requests meanwhile).
``process(items)`` returns one result per item, in order; a result that is an
``Exception`` is raised to that item's caller alone, so one bad item never fails the
others. An exception raised by ``process`` itself goes to every item of the batch.

The wait is only spent when it can pay off: requests announce themselves with
:meth:`Batcher.arriving` as soon as they start (before their body is read), and the
worker stops waiting as soon as no announced request is still on its way. A lone request
therefore goes out at once, while under load the batch fills up to ``max_batch``.
``fill_wait`` (a fraction, default 0) also waits that fraction of the last batch's
processing time for more requests when none is announced: worth it where a batch costs
about the same whatever its size (a large catalogue read once per batch).
With ``max_batch=1`` every item is processed alone (batching off).

The model-specific work (encoding, padding to fixed shapes, scoring) lives in ``process``
(``service.py``); this module knows nothing about it.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import time
from typing import Any, Callable, Sequence

Process = Callable[[list], Sequence[Any]]


class Batcher:
  """Gathers concurrently submitted items into batches for ``process`` (see the module).

  ``threaded=False`` runs ``process`` on the event loop itself instead of the worker thread.
  """

  def __init__(self, process: Process, *, max_batch: int = 64, max_wait_ms: float = 2.0,
               threaded: bool = True, fill_wait: float = 0.0):
    if not isinstance(max_batch, int) or max_batch < 1:
      raise ValueError(f"max_batch must be an integer >= 1; got {max_batch!r}.")
    if not max_wait_ms >= 0:
      raise ValueError(f"max_wait_ms must be >= 0; got {max_wait_ms!r}.")
    if not 0 <= fill_wait <= 1:
      raise ValueError(f"fill_wait must be between 0 and 1; got {fill_wait!r}.")
    self.fill_wait = fill_wait
    self._last_process_s = 0.0
    self.process = process
    self.threaded = threaded
    self.max_batch = max_batch
    self.max_wait_s = max_wait_ms / 1000.0
    # The sizes of the latest batches, and totals since the start (for tests and stats).
    self.batch_sizes: collections.deque = collections.deque(maxlen=4096)
    self.num_batches = 0
    self.num_items = 0
    self._queue: asyncio.Queue | None = None
    self._task: asyncio.Task | None = None
    self._coming = 0  # announced requests that have not been submitted yet
    self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="batcher")

  async def start(self) -> None:
    """Starts the worker task on the running event loop."""
    if self._task is None:
      self._queue = asyncio.Queue()
      self._task = asyncio.get_running_loop().create_task(self._work())

  async def stop(self) -> None:
    """Stops the worker; items still queued get a RuntimeError."""
    if self._task is not None:
      self._task.cancel()
      with contextlib.suppress(asyncio.CancelledError):
        await self._task
      self._task = None
    while self._queue is not None and not self._queue.empty():
      _, fut = self._queue.get_nowait()
      if not fut.done():
        fut.set_exception(RuntimeError("The server is shutting down; retry the request."))
    self._thread.shutdown(wait=True)

  @contextlib.contextmanager
  def arriving(self):
    """Marks a request on its way to :meth:`submit` (while its body is read and checked),
    so that a forming batch waits for it."""
    self._coming += 1
    try:
      yield
    finally:
      self._coming -= 1

  async def submit(self, item: Any) -> Any:
    """Queues ``item`` and returns its result (or raises its exception)."""
    if self._task is None:
      raise RuntimeError("Batcher.start() was not called (the app's lifespan starts it).")
    fut = asyncio.get_running_loop().create_future()
    self._queue.put_nowait((item, fut))
    return await fut

  async def run(self, fn: Callable, *args) -> Any:
    """Runs ``fn(*args)`` on the worker thread (in turn with batches)."""
    return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

  async def _gather(self) -> list:
    batch = [await self._queue.get()]
    first_s = time.monotonic()
    deadline = first_s + self.max_wait_s
    while len(batch) < self.max_batch:
      if not self._queue.empty():
        batch.append(self._queue.get_nowait())
        continue
      now = time.monotonic()
      left = deadline - now
      if left <= 0:
        break
      if self._coming <= 0:
        # Nobody is on the way. With fill_wait, still wait that fraction of the last
        # batch's processing time (when a batch costs about the same whatever its size,
        # a fuller one answers more requests for it); else go now.
        left = min(left, self.fill_wait * self._last_process_s - (now - first_s))
        if left <= 0:
          break
      try:  # another request is on its way: wait for it, up to the deadline
        batch.append(await asyncio.wait_for(self._queue.get(), left))
      except asyncio.TimeoutError:
        break
    return batch

  async def _work(self) -> None:
    loop = asyncio.get_running_loop()
    while True:
      batch = await self._gather()
      items = [item for item, _ in batch]
      self.batch_sizes.append(len(items))
      self.num_batches += 1
      self.num_items += len(items)
      try:
        start = time.monotonic()
        if self.threaded:
          results = await loop.run_in_executor(self._thread, self.process, items)
        else:
          results = self.process(items)
        self._last_process_s = time.monotonic() - start
        if len(results) != len(items):
          raise RuntimeError(f"process returned {len(results)} results for {len(items)} "
                             "items.")
      except Exception as e:  # pylint: disable=broad-except
        results = [e] * len(items)
      for (_, fut), result in zip(batch, results):
        if fut.done():  # the caller went away
          continue
        if isinstance(result, Exception):
          fut.set_exception(result)
        else:
          fut.set_result(result)
