"""Locating the MovieLens 100K folder, and downloading it into the user cache if allowed."""

from __future__ import annotations

import hashlib
import http.client
import io
import logging
import os
import pathlib
import shutil
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable

from twotower_jax.data.dataset import DataError

_log = logging.getLogger(__name__)

ML100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
# From tensorflow_datasets/url_checksums/movielens.txt (size 4924029 bytes).
ML100K_SHA256 = "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229"
ML100K_REQUIRED = ("u.data", "u.item", "u.user")
DATA_DIR_ENV = "TWOTOWER_DATA_DIR"
DOWNLOAD_TIMEOUT_S = 30.0


def _default_cache_dir() -> pathlib.Path:
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(root) / "twotower_jax" / "ml-100k"


def _holds_ml100k(path: pathlib.Path) -> pathlib.Path | None:
  """Returns the folder (``path`` or ``path/ml-100k``) holding the files, else None."""
  for candidate in (path, path / "ml-100k"):
    if all((candidate / name).is_file() for name in ML100K_REQUIRED):
      return candidate
  return None


def _missing_files_error(path: pathlib.Path, origin: str) -> DataError:
  missing = [n for n in ML100K_REQUIRED if not (path / n).is_file()]
  what = "does not exist" if not path.exists() else f"lacks {', '.join(missing)}"
  return DataError(
      f"MovieLens 100K directory {path} (from {origin}) {what}. Fix: point "
      f"{origin} at the folder that holds the extracted u.data, u.item and "
      f"u.user (or its parent containing ml-100k/), or unset it to use the "
      f"cache {_default_cache_dir()} and the automatic download.")


def fetch_url(url: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> bytes:
  """Downloads ``url`` into memory (the MovieLens 100K zip is ~5 MB)."""
  with urllib.request.urlopen(url, timeout=timeout) as response:
    return response.read()


def _extract(blob: bytes, cache_dir: pathlib.Path) -> None:
  """Extracts the zip ``blob`` into ``cache_dir`` through a temporary sibling folder."""
  cache_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=".ml-100k-", dir=cache_dir.parent))
  try:
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
      for info in archive.infolist():
        name = pathlib.PurePosixPath(info.filename)
        if name.is_absolute() or ".." in name.parts:
          raise DataError(f"unsafe path {info.filename!r} inside {ML100K_URL}")
      archive.extractall(tmp)
    extracted = _holds_ml100k(tmp)
    if extracted is None:
      raise DataError(f"{ML100K_URL} does not contain ml-100k/u.data, u.item, u.user")
    if _holds_ml100k(cache_dir) is None:  # else a concurrent run got there first
      shutil.rmtree(cache_dir, ignore_errors=True)
      extracted.rename(cache_dir)
  except zipfile.BadZipFile as e:
    raise DataError(f"{ML100K_URL} is not a valid zip archive: {e}") from e
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def download_ml100k(cache_dir: pathlib.Path,
                    fetch: Callable[[str], bytes] | None = None) -> pathlib.Path:
  """Downloads, checks (SHA-256) and extracts ml-100k.zip into ``cache_dir``.

  Raises DataError on network failure, checksum mismatch or a bad archive;
  nothing is left in ``cache_dir`` in that case.
  """
  fetch = fetch or fetch_url
  _log.info("Downloading %s into %s", ML100K_URL, cache_dir)
  try:
    blob = fetch(ML100K_URL)
  except (OSError, http.client.HTTPException) as e:  # URLError, timeouts are OSErrors
    raise DataError(f"downloading {ML100K_URL} failed: {e}") from e
  digest = hashlib.sha256(blob).hexdigest()
  if digest != ML100K_SHA256:
    raise DataError(
        f"the download of {ML100K_URL} has SHA-256 {digest} ({len(blob)} bytes), "
        f"expected {ML100K_SHA256} (4924029 bytes); a proxy or captive portal "
        "may have altered it")
  cache_dir = pathlib.Path(cache_dir)
  _extract(blob, cache_dir)
  return cache_dir


def resolve_data_dir(configured: str | os.PathLike | None = None, *, download: bool = True,
                     fetch: Callable[[str], bytes] | None = None) -> pathlib.Path:
  """Finds the MovieLens 100K folder; downloads it into the cache if allowed.

  Order: ``configured`` (``--config.data.dir``), env ``TWOTOWER_DATA_DIR``, the
  cache ``$XDG_CACHE_HOME/twotower_jax/ml-100k`` (default ``~/.cache``), then a
  checksum-verified download into that cache. An explicitly given folder that
  lacks the files is an error (no fall-through). ``fetch(url) -> bytes``
  replaces the network call (tests).
  """
  if configured is not None and str(configured) != "":
    path = pathlib.Path(configured).expanduser()
    found = _holds_ml100k(path)
    if found is None:
      raise _missing_files_error(path, "--config.data.dir")
    return found
  env = os.environ.get(DATA_DIR_ENV, "")
  if env:
    path = pathlib.Path(env).expanduser()
    found = _holds_ml100k(path)
    if found is None:
      raise _missing_files_error(path, f"${DATA_DIR_ENV}")
    return found
  cache = _default_cache_dir()
  found = _holds_ml100k(cache)
  if found is not None:
    return found
  looked = ["--config.data.dir (not set)", f"${DATA_DIR_ENV} (not set)", f"cache {cache}"]
  if not download:
    reason = "download is disabled (--config.data.download=False)"
  else:
    try:
      return download_ml100k(cache, fetch)
    except DataError as e:
      reason = str(e)
  raise DataError(
      "MovieLens 100K not found. Looked in: " + "; ".join(looked) + f". {reason}. "
      f"Fix: download {ML100K_URL}, unzip it, and pass --config.data.dir=PATH "
      f"or run `export {DATA_DIR_ENV}=PATH` (PATH = the folder holding u.data).")
