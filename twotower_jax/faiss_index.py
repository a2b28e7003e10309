"""FAISS indexes over a ``BruteForceIndex``'s embeddings (FAISS is an optional extra).

``to_faiss`` builds a flat (exact) or IVF (approximate) inner-product index;
``faiss_recall_at_k`` measures an approximate index against the exact top-k.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from twotower_jax import index as index_lib


def _faiss():
  try:
    import faiss
  except ImportError as e:
    raise ImportError(
      "FAISS is optional; install it with `pip install 'twotower_jax[faiss]'` (faiss-cpu)."
    ) from e
  return faiss


def to_faiss(index: index_lib.BruteForceIndex, kind: str = "flat", nlist: int = 1024, nprobe: int = 16):
  """A FAISS inner-product index over `index`'s embeddings; labels are row indices.

  kind: 'flat' (IndexFlatIP, exact) or 'ivf' (IndexIVFFlat with `nlist`
  lists, searching `nprobe` of them; trained on the embeddings).
  """
  faiss = _faiss()
  x = np.ascontiguousarray(np.asarray(index.embeddings_NxD, np.float32))
  d = x.shape[1]
  if kind == "flat":
    fi = faiss.IndexFlatIP(d)
  elif kind == "ivf":
    if not 1 <= nlist <= len(index):
      raise ValueError(f"nlist must be in [1, N={len(index)}], got {nlist}.")
    fi = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    fi.train(x)
    fi.nprobe = int(nprobe)
  else:
    raise ValueError(f"kind must be 'flat' or 'ivf', got {kind!r}.")
  fi.add(x)
  return fi


def faiss_recall_at_k(index: index_lib.BruteForceIndex, faiss_index, q_BxD: Any, k: int) -> float:
  """Recall@k of `faiss_index` against the exact top-k of `index`.

  Mean over queries of |faiss top-k ∩ exact top-k| / |exact top-k|.
  """
  _faiss()
  q = np.ascontiguousarray(np.asarray(q_BxD, np.float32))
  _, exact_rows = index_lib.exact_top_k(q, index.embeddings_NxD, k)
  _, f_rows = faiss_index.search(q, k)
  exact_rows = np.asarray(exact_rows)
  hits, total = 0, 0
  for e, f in zip(exact_rows, f_rows):
    e = e[e >= 0]
    hits += np.intersect1d(e, f[f >= 0]).size
    total += e.size
  return hits / max(total, 1)
