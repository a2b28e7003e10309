"""The portable loader's numpy encoders equal features.py's, kind by kind; its exact search
breaks ties as the index does; it imports nothing beyond the standard library, numpy, jax."""

import ast
import pathlib
import sys

import numpy as np
import pytest

from twotower_jax import features as feat
from twotower_jax import index as index_lib
from twotower_jax import portable
from twotower_jax import spec as S

REPO = pathlib.Path(__file__).resolve().parents[1]

TITLES = np.array(["Toy Story (1995)", "Amélie (2001)", "L'Âge d'or", "ΟΔΟΣ Στη (1980)",
                   "İstanbul_Nights 2 (1975-1979)", "toy soldiers", "Café Crème à Noël (1994)"])

# (spec, training values, query values): every kind, with unknown values, padding, values
# outside the training range, and the edge cases of each encoder.
CASES = {
    "id_int": (S.id("c"), np.array([1, 2, 2, 3, 5, 5, 5]), np.array([5, 1, 4, -1, 99, 3])),
    "id_int_max_size": (S.id("c", max_size=2, min_count=2), np.array([1, 2, 2, 3, 5, 5, 5]),
                        np.array([5, 2, 3, 1])),
    "id_int_text_query": (S.id("c"), np.array([10, 20, 20]), np.array(["20", "10", "x", ""])),
    "id_str": (S.id("c"), np.array(["a", "b", "b", "é", "zz"]),
               np.array(["b", "é", "nope", "", "A", "zz"])),
    "categorical_bool": (S.categorical("c"), np.array([True, False, True, True]),
                         np.array([False, True, True])),
    "hash_str": (S.id("c", hash_buckets=13), np.array(["x"]),
                 np.array(["x", "y", "", "éé", "x", "a long value"])),
    "hash_int": (S.categorical("c", hash_buckets=7), np.array([1]),
                 np.array([0, 1, -1, 2**40, -5, 123456789])),
    "numeric": (S.numeric("c"), np.array([18.0, 25, 33, 60, 41]), np.array([18.0, 40.5, 60])),
    "numeric_log": (S.numeric("c", log=True), np.array([0.0, 3, 10, 1000]),
                    np.array([0.0, 5.5, 999])),
    "numeric_raw": (S.numeric("c", normalize=False), np.array([1.5, 2]), np.array([7.25, -3])),
    "numeric_buckets": (S.numeric("c", buckets=3), np.arange(30.0),
                        np.array([-1.0, 0, 9.67, 10, 19.3, 29, 100])),
    "numeric_boundaries": (S.numeric("c", boundaries=(18, 30)), np.array([10.0, 40]),
                           np.array([17.9, 18, 29.99, 30, 31])),
    "timestamp": (S.timestamp("c", buckets=7), np.array([1000, 2000, 7000, 4000]),
                  np.array([1000, 999, 1833, 1834, 7000, 7001, 20000, -5000, 4000])),
    "multi_hot": (S.multi_hot("c", max_values=2), np.array(["a|b", "b|c|d", "", "a"]),
                  np.array(["a|b|c", "d||a", "", "zz|a", "c|b|a|d", "|"])),
    "multi_hot_sep": (S.multi_hot("c", sep=", "), np.array(["x, y", "y"]),
                      np.array(["y, x", "x,y", "y, , x"])),
    "multi_hot_ids": (S.multi_hot("c"), np.array([[1, 2, -1], [3, -1, -1]]),
                      np.array([[2, 3, 1], [-1, -1, -1], [9, 1, -1]])),
    "text": (S.text("c", max_words=3), TITLES,
             np.concatenate([TITLES, ["TOY story (1995)\n", "ΟΔΟΣ", "", "a_b d'or 2",
                                      "x (1995) y"]])),
    "history_int": (S.history("c", max_len=4), np.array([1, 2, 2, 3, 5]),
                    [[1, 2, 3], [], [99, 1], list(range(20)), [5, -1, 2], "3|1"]),
    "history_str": (S.history("c", max_len=3), np.array(["m1", "m2", "m2", "m3"]),
                    [["m1", "m9"], ["m3", "m2", "m1", "m2"], [], "m2|m3"]),
}


def _fitted(tmp_path, name, spec, train):
  """The encoder as an export stores it: fitted, written as JSON + npz, read back."""
  feat.save_encoders({name: feat.fit(spec, train)}, tmp_path)
  return feat.load_encoders(tmp_path)[name]


@pytest.mark.parametrize("case", sorted(CASES))
def test_encoding_equals_features_encode(case, tmp_path):
  spec, train, query = CASES[case]
  enc = _fitted(tmp_path, case, spec, train)
  want = feat.encode(case, spec, enc, query)
  got = portable.encode_feature(case, spec.to_dict(), enc, query)
  assert sorted(got) == sorted(want)
  for key in want:
    assert got[key].dtype == want[key].dtype, key
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  # The vocabulary-backed kinds really see unknown values (the cases are not trivial).
  if case.startswith("id_") and enc["kind"] == "vocab":
    assert (want[case] == feat.OOV).any() and (want[case] > 0).any()


def test_history_with_a_shared_hash_table_equals_features_encode():
  enc = {"kind": "hash", "buckets": 17, "width": 3}
  spec = S.history("c", max_len=3)
  query = [[1, 2, 3, 4], [], [-1, 7], [2**33]]
  want = feat.encode("h", spec, enc, query)["h"]
  np.testing.assert_array_equal(portable.encode_feature("h", spec.to_dict(), enc, query)["h"],
                                want)
  assert (want[0] > 0).all() and (want[1] == feat.PAD).all()


def test_history_side_columns_and_time_since_equal_features_encode():
  spec = S.history("c", max_len=4, side=("rating", "price"), time_since=True)
  enc = {**feat.fit(spec, np.array([1, 2, 2, 3, 5])), "time_mean": 1.5, "time_std": 0.7,
         **feat.fit_side([np.array([1.0, 5, 3, 4]), np.array([10.0, 20, 35])])}
  day = 86_400
  query = [
      {"items": [1, 2, 3], "side": {"rating": [5.0, None, 1.0], "price": [10.0, 20.0, 30.0]},
       "times": [0, day, 10 * day], "query_time": 30 * day},
      {"items": [5, 9, 1, 2, 3, 3], "side": {"rating": [1, 2, 3, 4, 5, 1.5]},
       "times": [0, 1, 2, 3, 4, 5 * day], "query_time": 2},  # items after the query: 0 days
      {"items": [2], "side": {}, "times": None, "query_time": None},
      [3, 1],  # items only: the training means
      {"items": [], "side": {"rating": []}, "times": [], "query_time": 7},
      {"items": [1, 2, 3], "times": [0, None, day], "query_time": 3 * day},  # one unknown
  ]
  want = feat.encode("h", spec, enc, query)
  got = portable.encode_feature("h", spec.to_dict(), enc, query)
  assert sorted(got) == sorted(want) == ["h", "h_side", "h_time_since"]
  for key in want:
    assert got[key].dtype == want[key].dtype, key
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  assert (want["h_side"] != 0).sum() > 5 and (want["h_time_since"] != 0).sum() > 3
  # A missing time reads the training mean (0 once normalized); the known ones do not.
  assert want["h_time_since"][5, 2] == 0 and (want["h_time_since"][5, [1, 3]] != 0).all()


def test_text_words_follow_the_tokenizer():
  assert portable.words("İstanbul_Nights ΟΔΟΣ (1975-1979)") == ["istanbul", "nights", "οδοσ"]
  assert portable.words("L'Âge d'or (1930) ") == ["l'âge", "d'or"]
  got = [portable.words(t) for t in TITLES]
  want = [[w for w in row if w] for row in feat.tokenize(TITLES).to_pylist()]
  assert got == want


def test_constants_and_kinds_match_the_package():
  from twotower_jax import history  # pylint: disable=g-import-not-at-top
  assert (portable.OOV, portable.PAD, portable.VALUE_SUFFIX, portable.SIDE_SUFFIX,
          portable.TIME_SINCE_SUFFIX) == (feat.OOV, feat.PAD, feat.VALUE_SUFFIX,
                                          feat.SIDE_SUFFIX, feat.TIME_SINCE_SUFFIX)
  assert portable.SECONDS_PER_DAY == history.SECONDS_PER_DAY
  assert portable._EPS == feat._EPS  # pylint: disable=protected-access
  assert portable.KINDS == S.KINDS  # a new kind needs its encoder here too


def test_unknown_kind_is_an_error_that_says_how_to_reexport():
  with pytest.raises(portable.PortableError, match="--mode=export_model"):
    portable.encode_feature("x", {"kind": "image"}, {}, np.zeros(2))


def test_exact_search_equals_the_index_with_ties_and_exclusions():
  rng = np.random.default_rng(0)
  c_NxD = rng.normal(size=(40, 4)).astype(np.float32)
  c_NxD[[5, 17, 30]] = c_NxD[2]  # four equal rows: ties go to the lower row
  c_NxD[9] = 0.0  # a zero score, as -0.0 and +0.0
  q_QxD = np.concatenate([c_NxD[[2]], -c_NxD[[2]], rng.normal(size=(5, 4))]).astype(np.float32)
  exclude = np.full((len(q_QxD), 3), -1, np.int32)
  exclude[0, :2] = [2, 30]
  exclude[3, 0] = 11
  for k in (1, 6, 40, 45):
    for ex in (None, exclude):
      want_s, want_i = index_lib.exact_top_k(q_QxD, c_NxD, k, exclude=ex)
      got_s, got_i = portable.exact_search(q_QxD, c_NxD, k, ex)
      np.testing.assert_array_equal(got_i, np.asarray(want_i))
      np.testing.assert_array_equal(got_s, np.asarray(want_s))
  scores, rows = portable.exact_search(q_QxD[:1], c_NxD, 40)
  tied = [int(np.flatnonzero(rows[0] == r)[0]) for r in (2, 5, 17, 30)]
  assert np.diff(tied).tolist() == [1, 1, 1]  # equal scores, one after the other, lower first
  assert len(set(scores[0, tied].tolist())) == 1
  _, rows = portable.exact_search(q_QxD[:1], c_NxD, 40, exclude[:1])
  assert 2 not in rows[0] and 30 not in rows[0] and rows[0, tied[0]] == 5


def test_exact_search_tiles_many_queries(monkeypatch):
  rng = np.random.default_rng(1)
  c_NxD = rng.normal(size=(300, 8)).astype(np.float32)
  q_QxD = rng.normal(size=(50, 8)).astype(np.float32)
  whole = portable.exact_search(q_QxD, c_NxD, 7)
  monkeypatch.setattr(portable, "_SCORE_BYTES", 4 * 300 * 8)  # tiles of 8 queries
  tiled = portable.exact_search(q_QxD, c_NxD, 7)
  np.testing.assert_array_equal(tiled[1], whole[1])
  np.testing.assert_array_equal(tiled[0], whole[0])


def _imports(path: pathlib.Path) -> tuple[set[str], set[str]]:
  """(modules imported at module level, modules imported inside functions): top names."""
  tree = ast.parse(path.read_text())
  top, inner = set(), set()
  for node in ast.walk(tree):
    names = ([a.name for a in node.names] if isinstance(node, ast.Import)
             else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
             else [])
    where = top if node in tree.body else inner
    where.update(n.split(".")[0] for n in names)
  return top, inner


def test_loader_imports_only_the_standard_library_numpy_and_jax():
  top, inner = _imports(REPO / "twotower_jax" / "portable.py")
  third_party = {m for m in top if m not in sys.stdlib_module_names and m != "__future__"}
  assert third_party == {"numpy", "jax"}
  assert inner - set(sys.stdlib_module_names) == {"faiss"}  # only for a saved FAISS index


def test_only_export_model_imports_the_loader():
  def imports_loader(path):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and (
          node.module == "twotower_jax.portable" or (
              node.module in ("twotower_jax", None) and any(a.name == "portable"
                                                           for a in node.names))):
        return True
      if isinstance(node, ast.Import) and any(a.name == "twotower_jax.portable"
                                              for a in node.names):
        return True
    return False

  users = [p.name for p in (REPO / "twotower_jax").rglob("*.py") if imports_loader(p)]
  assert users == ["export_model.py"]
