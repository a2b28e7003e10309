"""Index kinds for serving: exact, FAISS IVF and FAISS HNSW, all with one search contract.

``serve.index`` picks the kind:

* ``exact`` (the default and the reference): :class:`index.BruteForceIndex`.
* ``faiss_ivf``: ``IndexIVFFlat`` (inverted lists over k-means cells, ``serve.ivf_nlist``
  cells, ``serve.ivf_nprobe`` of them searched per query).
* ``faiss_hnsw``: ``IndexHNSWFlat`` (a navigable graph, ``serve.hnsw_m`` links per node,
  ``serve.hnsw_ef_construction`` / ``serve.hnsw_ef_search`` beam widths).

Both FAISS kinds score by inner product (the model's score is the dot product). FAISS is an
optional extra (``pip install 'twotower_jax[faiss]'``); it is imported only when a FAISS kind
is built or loaded.

Every kind answers ``search(q_QxD, k, exclude=..., allow=...)`` as ``BruteForceIndex``
does: (scores [Q, k] float32, ids [Q, k] int64), best first, missing slots id -1 and score
-inf. Exclusions and allow-lists work with every kind:

* an allow-list becomes a FAISS ``IDSelectorBitmap`` passed in the search parameters
  (``sel=``), so only allowed items are visited;
* per-query exclusions are handled by over-fetching: each query asks for k + E results (E
  the longest exclusion list) and the excluded ones are dropped;
* a query left with fewer than min(k, items available to it) results (the probed cells or
  the graph walk held too few allowed, non-excluded items) is answered again by the exact
  index, so a small allow-list or a long exclusion list never loses results that exist.

FAISS labels are row numbers (0..N-1); ``ids_N`` maps them to ids, as in
``BruteForceIndex``. :func:`add` appends rows (IVF: to the trained cells; HNSW: into the
graph) without rebuilding. :func:`save` writes ``index.faiss`` and returns the kind and
options for ``serving.json``; :func:`load` reads it back.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import sys
from typing import Any, Mapping

import numpy as np

from twotower_jax import index as index_lib

KINDS = ("exact", "faiss_ivf", "faiss_hnsw")
INDEX_FILE = "index.faiss"
# Defaults of the serve.* options (config.base_config holds the same values).
DEFAULTS = {"ivf_nlist": 0, "ivf_nprobe": 32, "hnsw_m": 32, "hnsw_ef_construction": 64,
            "hnsw_ef_search": 128}
_MIN_POINTS_PER_CELL = 39  # FAISS k-means wants at least this many training points per cell
_TRAIN_POINTS_PER_CELL = 64  # IVF cells are trained on at most this many points per cell


class AnnError(ValueError):
  """An index cannot be built, loaded or searched; the message says why and what to do."""


def faiss_module():
  """The ``faiss`` module, or an ImportError saying how to install it.

  Before the first import, OMP_WAIT_POLICY defaults to PASSIVE: FAISS's OpenMP threads
  otherwise spin after each search and take the cores from the NumPy work around it (on 2
  cores, IVF searches through ``FaissIndex.search`` ran 2.7x slower). Set it to override.
  """
  if "faiss" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  try:
    import faiss  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("serve.index='faiss_ivf' or 'faiss_hnsw' needs FAISS, an optional extra: "
                      "pip install 'twotower_jax[faiss]' (faiss-cpu), or use "
                      "serve.index='exact'.") from e
  return faiss


def options_of(serve_cfg: Mapping[str, Any]) -> dict[str, int]:
  """The index options (``DEFAULTS``' keys) from a ``config.serve`` section."""
  return {k: int(serve_cfg.get(k, v)) for k, v in DEFAULTS.items()}


def auto_nlist(n: int) -> int:
  """IVF cells for N items when ``serve.ivf_nlist`` is 0: about 4 sqrt(N), with at least
  39 items per cell (FAISS's k-means minimum)."""
  return max(1, min(int(round(4 * math.sqrt(n))), n // _MIN_POINTS_PER_CELL))


# ----------------------------------------------------------------------------
# Exclusions as row numbers.


def _exclude_rows(exclude: Any, num_queries: int, exact: index_lib.BruteForceIndex
                  ) -> np.ndarray | None:
  """[Q, E] row numbers (-1 padded; unknown ids dropped) from the forms ``search`` takes: a
  padded [Q, E] id array, a list of Q id lists, or CSR ``(indptr_Q1, ids)``."""
  if exclude is None:
    return None
  if (isinstance(exclude, tuple) and len(exclude) == 2 and np.ndim(exclude[0]) == 1
      and len(exclude[0]) == num_queries + 1 and num_queries != 2):
    ids = index_lib.csr_to_padded(*exclude)
  elif isinstance(exclude, (list, tuple)):
    if len(exclude) != num_queries:
      raise AnnError(f"exclude has {len(exclude)} entries for {num_queries} queries; pass one "
                     "id list per query, a padded [Q, E] array, or CSR (indptr, ids).")
    rows = [np.asarray(r, np.int64).reshape(-1) for r in exclude]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    ids = index_lib.csr_to_padded(indptr, np.concatenate(rows) if rows
                                  else np.zeros(0, np.int64))
  else:
    ids = np.asarray(exclude)
    if ids.ndim != 2 or ids.shape[0] != num_queries or ids.dtype.kind not in "iu":
      raise AnnError(f"exclude must give integer ids per query: [Q={num_queries}, E] padded "
                     f"with -1, a list of {num_queries} id lists, or CSR (indptr, ids); got "
                     f"{ids.dtype}{ids.shape}.")
  return np.where(ids >= 0, exact.rows(ids), -1).astype(np.int64)


def _distinct_per_row(rows_QxE: np.ndarray) -> np.ndarray:
  """How many distinct non-negative values each row holds."""
  s = np.sort(rows_QxE, axis=1)
  new = s >= 0
  new[:, 1:] &= s[:, 1:] != s[:, :-1]
  return new.sum(1)


# ----------------------------------------------------------------------------
# The FAISS kinds.


@dataclasses.dataclass(frozen=True, eq=False)
class FaissIndex:
  """A FAISS IVF or HNSW index over the rows of ``exact`` (labels = row numbers), with the
  exact index kept for fallbacks; ``search`` as ``BruteForceIndex.search``."""

  kind: str
  options: dict[str, int]
  faiss_index: Any
  exact: index_lib.BruteForceIndex

  def __post_init__(self):
    if self.faiss_index.ntotal != len(self.exact):
      raise AnnError(f"the {self.kind} index holds {self.faiss_index.ntotal} items but the "
                     f"catalogue has {len(self.exact)}; rebuild it (retrain, or add_items "
                     "from a consistent serving directory).")

  @property
  def embeddings_NxD(self):
    return self.exact.embeddings_NxD

  @property
  def ids_N(self) -> np.ndarray:
    return self.exact.ids_N

  @property
  def titles_N(self):
    return self.exact.titles_N

  def __len__(self) -> int:
    return len(self.exact)

  def rows(self, ids: Any) -> np.ndarray:
    return self.exact.rows(ids)

  def titles(self, ids: Any) -> np.ndarray:
    return self.exact.titles(ids)

  def _params(self, k_fetch: int, selector):
    faiss = faiss_module()
    if self.kind == "faiss_ivf":
      p = faiss.SearchParametersIVF()
      p.nprobe = self.options["ivf_nprobe"]
    else:
      p = faiss.SearchParametersHNSW()
      p.efSearch = max(self.options["hnsw_ef_search"], k_fetch)
    if selector is not None:
      p.sel = selector
    return p

  def search(self, q_BxD: Any, k: int, exclude: Any = None, allow: Any = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ids per query (see the module docstring for exclusions and allow-lists).

    Returns:
      (scores_Bxk float32, ids_Bxk int64) as NumPy arrays; missing slots -inf / -1.
    """
    faiss = faiss_module()
    n, dim = len(self), self.faiss_index.d
    q = np.ascontiguousarray(np.asarray(q_BxD, np.float32))
    if q.ndim != 2 or q.shape[1] != dim:
      raise AnnError(f"queries must be [B, {dim}], got shape {q.shape}.")
    if not np.isfinite(q).all():
      raise AnnError("queries contain NaN or inf; check the query tower inputs.")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
      raise AnnError(f"k must be an integer >= 1, got {k!r}.")
    k, num_q = int(k), q.shape[0]
    ex = _exclude_rows(exclude, num_q, self.exact)
    allow_N, selector, bitmap = None, None, None
    if allow is not None:
      rows = self.rows(np.asarray(allow).reshape(-1))
      allow_N = np.zeros(n, bool)
      allow_N[rows[rows >= 0]] = True
      bitmap = np.packbits(allow_N, bitorder="little")
      selector = faiss.IDSelectorBitmap(n, faiss.swig_ptr(bitmap))
    available = np.full(num_q, n if allow_N is None else int(allow_N.sum()), np.int64)
    width = 0
    if ex is not None:
      counted = ex if allow_N is None else np.where((ex >= 0) & allow_N[np.maximum(ex, 0)],
                                                    ex, -1)
      available -= _distinct_per_row(counted)
      width = ex.shape[1]
    k_fetch = max(1, min(n, k + width))
    if n == 0 or num_q == 0:
      d_Bxk, i_Bxk = (np.full((num_q, k_fetch), -np.inf, np.float32),
                      np.full((num_q, k_fetch), -1, np.int64))
    else:
      d_Bxk, i_Bxk = self.faiss_index.search(q, k_fetch, params=self._params(k_fetch, selector))
    del bitmap  # the selector reads it during the search only
    valid = i_Bxk >= 0
    if ex is not None and ex.size:
      base = np.arange(num_q, dtype=np.int64)[:, None] * (n + 1)
      ex_keys = (base + ex)[ex >= 0]
      valid &= ~np.isin(base + i_Bxk, ex_keys)
    order = np.argsort(~valid, axis=1, kind="stable")[:, :k]  # kept results first, in order
    rows_Bxk = np.take_along_axis(np.where(valid, i_Bxk, -1), order, axis=1)
    scores_Bxk = np.take_along_axis(np.where(valid, d_Bxk, -np.inf), order, axis=1)
    if rows_Bxk.shape[1] < k:
      pad = k - rows_Bxk.shape[1]
      rows_Bxk = np.pad(rows_Bxk, ((0, 0), (0, pad)), constant_values=-1)
      scores_Bxk = np.pad(scores_Bxk, ((0, 0), (0, pad)), constant_values=-np.inf)
    ids_Bxk = np.where(rows_Bxk >= 0, self.ids_N[np.maximum(rows_Bxk, 0)], -1)
    scores_Bxk = scores_Bxk.astype(np.float32)
    short = np.flatnonzero((rows_Bxk >= 0).sum(1) < np.minimum(k, available))
    if short.size:  # too few found approximately: the exact index answers these queries
      ex_ids = None
      if ex is not None:
        ex_ids = np.where(ex[short] >= 0, self.ids_N[np.maximum(ex[short], 0)], -1)
      s, i = self.exact.search(q[short], k, exclude=ex_ids,
                               allow=None if allow_N is None else self.ids_N[allow_N])
      scores_Bxk[short], ids_Bxk[short] = s, i
    return scores_Bxk, ids_Bxk.astype(np.int64)


def _new_faiss(kind: str, dim: int, n: int, options: Mapping[str, int]):
  faiss = faiss_module()
  if kind == "faiss_hnsw":
    fi = faiss.IndexHNSWFlat(dim, int(options["hnsw_m"]), faiss.METRIC_INNER_PRODUCT)
    fi.hnsw.efConstruction = int(options["hnsw_ef_construction"])
    return fi
  nlist = int(options["ivf_nlist"]) or auto_nlist(n)
  if not 1 <= nlist <= max(n, 1):
    raise AnnError(f"serve.ivf_nlist={nlist} exceeds the catalogue's {n} items; use at most "
                   f"{n} (about 4 sqrt(N)), or 0 to choose it from N.")
  return faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)


def build(kind: str, embeddings_NxD: Any, options: Mapping[str, int] | None = None,
          ids_N: Any = None, titles_N: Any = None):
  """An index of ``kind`` (``KINDS``) over the embeddings; ids default to row numbers.

  IVF trains its cells by k-means on a seeded sample of at most 64 points per cell.
  """
  if kind not in KINDS:
    raise AnnError(f"serve.index={kind!r}: must be one of {', '.join(KINDS)}.")
  emb = np.ascontiguousarray(np.asarray(embeddings_NxD, np.float32))
  ids = np.arange(len(emb), dtype=np.int64) if ids_N is None else ids_N
  exact = index_lib.BruteForceIndex(embeddings_NxD=emb, ids_N=ids, titles_N=titles_N)
  if kind == "exact":
    return exact
  opts = dict(DEFAULTS, **(options or {}))
  fi = _new_faiss(kind, emb.shape[1], len(emb), opts)
  if kind == "faiss_ivf":
    if len(emb) == 0:
      raise AnnError("an IVF index needs items to train its cells; the catalogue is empty.")
    sample = emb
    if len(emb) > _TRAIN_POINTS_PER_CELL * fi.nlist:  # k-means on a seeded sample
      rows = np.random.default_rng(0).choice(len(emb), _TRAIN_POINTS_PER_CELL * fi.nlist,
                                             replace=False)
      sample = emb[np.sort(rows)]
    fi.train(sample)
    opts["ivf_nlist"] = int(fi.nlist)
  fi.add(emb)
  return FaissIndex(kind=kind, options=opts, faiss_index=fi, exact=exact)


def kind_of(index) -> str:
  return index.kind if isinstance(index, FaissIndex) else "exact"


def add(index, new_embeddings_MxD: Any, new_ids_M: Any = None):
  """A new index holding ``index``'s rows and then the new ones (ids default to the next row
  numbers). FAISS kinds insert into a copy of the same structure (IVF keeps its cells)."""
  new = np.ascontiguousarray(np.asarray(new_embeddings_MxD, np.float32))
  old = np.asarray(index.embeddings_NxD, np.float32)
  if new.ndim != 2 or new.shape[1] != old.shape[1]:
    raise AnnError(f"new embeddings must be [M, {old.shape[1]}], got shape {new.shape}.")
  ids = (np.arange(len(old), len(old) + len(new), dtype=np.int64) if new_ids_M is None
         else np.asarray(new_ids_M, np.int64))
  exact = index_lib.BruteForceIndex(embeddings_NxD=np.concatenate([old, new]),
                                    ids_N=np.concatenate([index.ids_N, ids]))
  if not isinstance(index, FaissIndex):
    return exact
  faiss = faiss_module()
  fi = faiss.deserialize_index(faiss.serialize_index(index.faiss_index))  # leave `index` as is
  fi.add(new)
  return FaissIndex(kind=index.kind, options=dict(index.options), faiss_index=fi, exact=exact)


# ----------------------------------------------------------------------------
# Files.


def save(index, directory: str | pathlib.Path) -> dict[str, Any]:
  """Writes a FAISS index to ``directory/index.faiss``; returns ``{"kind", "options",
  "file", "size"}`` for ``serving.json`` (the exact kind writes nothing: it is the
  candidate embeddings)."""
  if not isinstance(index, FaissIndex):
    (pathlib.Path(directory) / INDEX_FILE).unlink(missing_ok=True)  # a stale one
    return {"kind": "exact", "size": len(index)}
  faiss = faiss_module()
  faiss.write_index(index.faiss_index, str(pathlib.Path(directory) / INDEX_FILE))
  return {"kind": index.kind, "options": dict(index.options), "file": INDEX_FILE,
          "size": len(index)}


def load(directory: str | pathlib.Path, meta: Mapping[str, Any] | None, embeddings_NxD: Any,
         ids_N: Any = None):
  """The index described by ``meta`` (what :func:`save` returned; None: exact) over the
  directory's candidate embeddings."""
  kind = (meta or {}).get("kind", "exact")
  emb = np.ascontiguousarray(np.asarray(embeddings_NxD, np.float32))
  ids = np.arange(len(emb), dtype=np.int64) if ids_N is None else ids_N
  exact = index_lib.BruteForceIndex(embeddings_NxD=emb, ids_N=ids)
  if kind == "exact":
    return exact
  if kind not in KINDS:
    raise AnnError(f"unknown index kind {kind!r} (known: {', '.join(KINDS)}).")
  faiss = faiss_module()
  path = pathlib.Path(directory) / meta.get("file", INDEX_FILE)
  if not path.is_file():
    raise AnnError(f"{path} is missing: serving.json names a {kind} index there.")
  try:
    fi = faiss.read_index(str(path))
  except RuntimeError as e:
    raise AnnError(f"{path} is not a readable FAISS index ({e}).") from e
  return FaissIndex(kind=kind, options=dict(DEFAULTS, **meta.get("options", {})),
                    faiss_index=fi, exact=exact)
