"""Feature encoders, one per spec kind: Keras lookup/discretization/normalization semantics,
fitted on training data only, plain-data I/O, and the spec-against-data checks."""

import re

import numpy as np
import pyarrow as pa
import pytest

from twotower_jax import features as feat
from twotower_jax import spec
from twotower_jax.data.dataset import DataError


def test_vocab_orders_by_frequency_then_value_and_oov_is_zero():
  enc = feat.fit_vocab(np.array(["b", "a", "c", "a", "b", "a"]))
  assert enc["vocab"].tolist() == ["a", "b", "c"]
  assert feat.lookup(enc, np.array(["a", "c", "zzz", "b"])).tolist() == [1, 3, 0, 2]
  assert feat.vocab_rows(enc) == 4
  # The same from pyarrow strings.
  assert feat.lookup(enc, pa.array(["a", "c", "zzz", "b"])).tolist() == [1, 3, 0, 2]


def test_integer_vocab_keeps_padding():
  enc = feat.fit_vocab(np.array([[5, -1], [7, 5], [9, -1]]))
  assert enc["vocab"].tolist() == [5, 7, 9]
  assert feat.lookup(enc, np.array([[9, -1], [4, 5]])).tolist() == [[3, -1], [0, 1]]


def test_vocab_max_size_and_min_count():
  enc = feat.fit_vocab(np.array([1, 1, 2, 3, 3, 3]), max_size=2)
  assert enc["vocab"].tolist() == [3, 1]
  assert feat.lookup(enc, np.array([2])).tolist() == [0]
  assert feat.fit_vocab(np.array([1, 1, 2, 3, 3, 3]), min_count=2)["vocab"].tolist() == [3, 1]


def test_hashing_is_stable_and_in_range():
  enc = feat.fit_vocab(np.arange(10), hash_buckets=7)
  assert enc == {"kind": "hash", "buckets": 7} and feat.vocab_rows(enc) == 8
  ids = np.arange(1000)
  rows = feat.lookup(enc, ids)
  assert rows.min() >= 1 and rows.max() <= 7 and len(np.unique(rows)) == 7
  np.testing.assert_array_equal(rows, feat.lookup(enc, ids))  # the same every time
  words = feat.lookup(enc, pa.array(["x", "y", "x"]))
  assert words[0] == words[2] and 1 <= words.min() and words.max() <= 7


def test_bucket_boundaries_match_keras_discretization():
  s = spec.numeric("x", boundaries=(0.0, 10.0, 100.0))
  x = np.array([-5, 10000, 150, 10, 5, 100])
  # Keras Discretization docs: [-5, 10000, 150, 10, 5, 100] -> [0, 3, 3, 2, 1, 3].
  assert feat.encode("x", s, feat.fit(s, x), x)["x"].tolist() == [0, 3, 3, 2, 1, 3]


def test_normalizer_stores_the_training_range():
  s = spec.numeric("x")
  enc = feat.fit(s, np.array([1.0, 2.0, 3.0, 4.0]))
  assert enc["mean"] == 2.5 and enc["var"] == pytest.approx(1.25)
  assert feat.value_range(enc) == (1.0, 4.0)
  np.testing.assert_allclose(feat.normalize(enc, np.array([2.5, 3.618034])), [0.0, 1.0],
                             atol=1e-5)


def _python_words(title: str, max_words: int) -> list[str]:
  """The reference tokenizer: Python's Unicode word characters, a trailing year dropped."""
  title = re.sub(r"\(\d{4}(?:\s*[-\u2013]\s*\d{0,4})?\)\s*$", "", title).lower()
  return re.findall(r"(?:[^\W_]|')+", title)[:max_words]


def test_text_tokens_match_the_python_reference():
  titles = ["Toy Story (1995)", "Amélie: Le Fabuleux (2001)", "Ça_va, Schindler's List",
            "Fawlty Towers (1975-1979)", "", "Seven (Se7en) (1995)"]
  s = spec.text("t", max_words=3)
  enc = feat.fit(s, np.array(titles))
  x = feat.encode("t", s, enc, np.array(titles))["t"]
  vocab = np.asarray([""] + enc["vocab"].tolist())
  got = [[str(vocab[i]) for i in row if i >= 0] for row in x]
  assert got == [_python_words(t, 3) for t in titles]
  assert x.shape == (len(titles), 3)


def test_numeric_kinds():
  x = np.array([1.0, 10.0, 100.0, 1000.0])
  plain = spec.numeric("x")
  enc = feat.fit(plain, x)
  np.testing.assert_allclose(feat.encode("x", plain, enc, x)["x"], (x - x.mean()) / x.std(),
                             rtol=1e-5)
  logged = spec.numeric("x", log=True)
  enc = feat.fit(logged, x)
  assert enc["mean"] == pytest.approx(np.log1p(x).mean())
  buckets = spec.numeric("x", buckets=2)
  enc = feat.fit(buckets, x)
  assert feat.rows(buckets, enc) == 2 and feat.encode("x", buckets, enc, x)["x"].tolist() == [
      0, 0, 1, 1]
  given = spec.numeric("x", boundaries=(5, 50))
  enc = feat.fit(given, x)
  assert feat.encode("x", given, enc, x)["x"].tolist() == [0, 1, 2, 2]
  assert feat.rows(plain, feat.fit(plain, x)) == 0  # the value enters the tower as is


def test_timestamp_buckets_clip_to_the_populated_ones():
  s = spec.timestamp("ts", buckets=5)
  enc = feat.fit(s, np.array([10, 20, 30]))
  out = feat.encode("ts", s, enc, np.array([0, 10, 29, 30, 99]))
  assert out["ts"].tolist() == [1, 1, 4, 4, 4]  # never the untrained rows 0 and 5
  assert feat.rows(s, enc) == 6
  np.testing.assert_allclose(out["ts_value"][1], (10 - 20) / np.std([10, 20, 30]), rtol=1e-5)


def test_multi_hot_from_strings_or_padded_ids():
  s = spec.multi_hot("tags")
  enc = feat.fit(s, pa.array(["a|b", "c", "", None, "a"]))
  assert enc["vocab"].tolist() == ["a", "b", "c"] and enc["width"] == 2
  x = feat.encode("tags", s, enc, np.array(["b|a|zz", "", "c"]))["tags"]
  assert x.tolist() == [[2, 1], [-1, -1], [3, -1]]  # the third value cut at width 2
  first = spec.multi_hot("g", max_values=1)
  enc = feat.fit(first, np.array([[3, 1], [1, -1]]))
  assert feat.encode("g", first, enc, np.array([[3, 1], [7, -1]]))["g"].tolist() == [[2], [0]]


def test_single_valued_missing_values_are_out_of_vocabulary():
  s = spec.categorical("year")
  enc = feat.fit(s, np.array([1990, -1, 1991, 1990]))
  assert feat.encode("year", s, enc, np.array([1990, -1, 2000]))["year"].tolist() == [1, 0, 0]


def _toy_columns():
  train = {
      "user_id": np.array([1, 2, 2, 3]),
      "age": np.array([20.0, 30.0, 30.0, 40.0]),
      "country": pa.array(["DE", "FR", "FR", "IT"]),
      "ts": np.array([100, 200, 300, 400]),
      "item": np.array([10, 11, 10, 12]),
  }
  items = {
      "item": np.array([10, 11, 12, 13]),
      "name": pa.array(["Red shoe", "Blue shirt", "Red book", "Green toy"]),
      "tags": pa.array(["red|sale", "blue", "red", "green"]),
  }
  return train, items


SPECS = {
    "query": {"user": spec.id("user_id"), "age": spec.numeric("age"),
              "country": spec.categorical("country"), "ts": spec.timestamp("ts", buckets=3)},
    "candidate": {"item": spec.id("item"), "words": spec.text("name", max_words=2),
                  "tags": spec.multi_hot("tags")},
}


def test_fit_on_training_data_only_and_encode_every_row():
  train, items = _toy_columns()
  train_rows = np.array([0, 1, 0, 2])  # item 13 never occurs in training
  enc = feat.fit_encoders(SPECS["query"], SPECS["candidate"], train, items, train_rows)
  assert enc["item"]["vocab"].tolist() == [10, 11, 12]
  assert "toy" not in enc["words"]["vocab"] and "green" not in enc["tags"]["vocab"]
  c = feat.encode_tower(SPECS["candidate"], enc, items, "items table")
  assert c["item"].tolist() == [1, 2, 3, 0] and c["tags"][3].tolist() == [0, -1]
  q = feat.encode_tower(SPECS["query"], enc, train, "interactions")
  assert set(q) == {"user", "age", "country", "ts", "ts_value"}
  assert q["user"].tolist() == [2, 1, 1, 3]  # user 2 is the most frequent, then by value
  rows = feat.embedding_rows(SPECS["query"], enc)
  assert rows == {"user": 4, "age": 0, "country": 4, "ts": 4}


def test_encoders_round_trip_as_plain_data(tmp_path):
  train, items = _toy_columns()
  enc = feat.fit_encoders(SPECS["query"], SPECS["candidate"], train, items,
                          np.array([0, 1, 0, 2]))
  feat.save_encoders(enc, tmp_path)
  back = feat.load_encoders(tmp_path)
  assert set(back) == set(enc)
  for name in enc:
    for key, value in enc[name].items():
      np.testing.assert_array_equal(np.asarray(back[name][key]), np.asarray(value))
  with pytest.raises(FileNotFoundError, match="encoders.json is missing"):
    feat.load_encoders(tmp_path / "nope")


def test_spec_problems_against_the_data_come_in_one_message(monkeypatch):
  train, items = _toy_columns()
  train["age"] = pa.array(["20", "x", "30", "40"])
  monkeypatch.setattr(feat, "MAX_CATEGORIES", 2)
  specs = {"query": {"age": spec.numeric("age"), "country": spec.categorical("country"),
                     "gone": spec.categorical("no_such_column")},
           "candidate": {"item": spec.id("item")}}
  with pytest.raises(DataError) as e:
    feat.check_columns(specs, train, items)
  msg = str(e.value)
  assert "features.query.age (numeric of column 'age'): the column holds text" in msg
  assert "features.query.country" in msg and "3 distinct values" in msg and "spec.id" in msg
  assert "no such column in the interactions" in msg and "columns there:" in msg


def test_even_buckets_equal_a_binary_search():
  rng = np.random.default_rng(0)
  for _ in range(10):
    lo = rng.uniform(-1e9, 1e9)
    b = np.linspace(lo, lo + rng.uniform(1e-3, 1e10), int(rng.integers(2, 2000)))
    x = np.concatenate([rng.uniform(b[0] - 1e3, b[-1] + 1e3, 10_000), b,
                        np.nextafter(b, -np.inf), np.nextafter(b, np.inf)])
    np.testing.assert_array_equal(feat.even_buckets(b, x),
                                  np.searchsorted(b, x, side="right"))


def test_timestamp_values_run_at_most_one_training_span_past_training():
  s = spec.timestamp("ts", buckets=5)
  enc = feat.fit(s, np.array([100.0, 200.0, 300.0]))
  inside = feat.encode("ts", s, enc, np.array([150.0, 350.0]))["ts_value"]
  far = feat.encode("ts", s, enc, np.array([1e20, -1e20]))["ts_value"]
  np.testing.assert_allclose(inside, (np.array([150.0, 350.0]) - 200.0) / np.std([100, 200, 300]),
                             rtol=1e-5)
  np.testing.assert_allclose(far, (np.array([500.0, -100.0]) - 200.0) / np.std([100, 200, 300]),
                             rtol=1e-5)
