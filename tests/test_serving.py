"""The serving directory: round trip, Python API, and clear errors for broken directories."""

import json
import pathlib
import shutil

import numpy as np
import pytest

from twotower_jax import config as config_lib
from twotower_jax import serving
from twotower_jax import train
from twotower_jax import input_pipeline
from twotower_jax import checkpoints
from twotower_jax import model as model_lib
from conftest import GENRES, write_synthetic_ml100k

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  data_dir = write_synthetic_ml100k(tmp_path_factory.mktemp("ml100k"), num_users=80,
                                    num_movies=150, num_ratings=3000, seed=5)
  cfg = config_lib.load_config_file(REPO / "configs" / "tiny.py")
  cfg.data.dir = str(data_dir)
  cfg.data.download = False
  cfg.eval.baselines = False
  cfg.train.num_epochs = 1
  workdir = tmp_path_factory.mktemp("run")
  train.train_and_evaluate(cfg, str(workdir))
  return workdir, cfg


def test_round_trip_reproduces_the_trained_query_tower(trained):
  workdir, cfg = trained
  rec = serving.load(workdir / "serving")
  prep = input_pipeline.prepare(cfg)
  model = model_lib.create_model(cfg.model, prep.query_features, prep.candidate_features)
  params = checkpoints.load_params(workdir)
  # The same 5 test interactions embedded by the training code and by the serving directory.
  xq = {k: v[:5] for k, v in prep.test_q.items()}
  want = np.asarray(model_lib.embed_queries(params, xq, model=model))
  assert rec.query_columns() == ["raw_user_age", "user_gender", "user_occupation_text",
                                 "timestamp"]
  raw = {c: prep.test[c][:5] for c in rec.query_columns()}
  np.testing.assert_allclose(rec.embed(raw), want, rtol=1e-5, atol=1e-6)
  # Candidate embeddings in the directory equal the model's.
  c_want = np.asarray(model_lib.embed_candidates(params, prep.cand, model=model))
  np.testing.assert_allclose(np.asarray(rec.index.embeddings_NxD), c_want, rtol=1e-5, atol=1e-6)


def test_recommend_from_python_matches_brute_force(trained):
  workdir, _ = trained
  rec = serving.load(workdir)  # the workdir itself also works
  feats = {"raw_user_age": [30.0, 55.0], "user_gender": [True, False],
           "user_occupation_text": ["engineer", "astronaut"], "timestamp": [880000000] * 2}
  r = rec.recommend(feats, 7)
  q = rec.embed(feats)
  scores = q @ np.asarray(rec.index.embeddings_NxD).T
  assert r.valid.all()
  for row in range(2):
    order = np.argsort(-scores[row], kind="stable")[:7]
    assert r.item_id[row].tolist() == rec.item_ids_N[order].tolist()
    np.testing.assert_allclose(r.score[row], scores[row][order], rtol=1e-5, atol=1e-6)
    genres = [g.split("|") for g in r.columns["movie_genres"][row]]
    assert all(g and set(g) <= set(GENRES) for g in genres), genres


def test_only_serving_files_are_needed(trained, tmp_path):
  workdir, _ = trained
  copy = tmp_path / "serving_only"
  shutil.copytree(workdir / "serving", copy)
  rec = serving.load(copy)
  assert rec.recommend(rec.user_features([1]), 3).item_id.shape == (1, 3)


def test_missing_file_is_named(trained, tmp_path):
  workdir, _ = trained
  broken = tmp_path / "broken"
  shutil.copytree(workdir / "serving", broken)
  (broken / "candidates.npz").unlink()
  with pytest.raises(serving.ServingError, match=r"incomplete: missing \['candidates.npz'\]"):
    serving.load(broken)


@pytest.mark.parametrize("name", ["query_params.npz", "candidates.npz", "users.npz"])
def test_corrupt_file_is_reported(trained, tmp_path, name):
  workdir, _ = trained
  broken = tmp_path / "corrupt"
  shutil.copytree(workdir / "serving", broken)
  (broken / name).write_bytes(b"not a zip file")
  with pytest.raises(serving.ServingError) as e:
    serving.load(broken)
  msg = str(e.value)
  assert f"Serving directory {broken} is corrupt: {name} is unreadable" in msg, msg
  assert "retrain into a fresh workdir" in msg


def test_wrong_format_version_is_reported(trained, tmp_path):
  workdir, _ = trained
  broken = tmp_path / "version"
  shutil.copytree(workdir / "serving", broken)
  meta = json.loads((broken / "serving.json").read_text())
  meta["format_version"] = 99
  (broken / "serving.json").write_text(json.dumps(meta))
  with pytest.raises(serving.ServingError, match="format_version 99"):
    serving.load(broken)


def test_not_a_directory(tmp_path):
  with pytest.raises(serving.ServingError, match="not found"):
    serving.load(tmp_path / "nope")


def test_unknown_user_is_a_clear_error(trained):
  workdir, _ = trained
  rec = serving.load(workdir)
  with pytest.raises(serving.ServingError, match="User 99999 has no training interactions, so "
                                                 "its features are unknown"):
    rec.user_features([99999])


@pytest.mark.parametrize("lowest", [False, True])
def test_padding_slots_have_no_title_or_genres(trained, lowest):
  """k above the catalogue (150 movies) or after exclusions: id -1, score -inf, no title."""
  workdir, _ = trained
  rec = serving.load(workdir)
  feats = rec.user_features([3])
  num_movies = len(rec.index.ids_N)
  r = rec.recommend(feats, num_movies + 5, lowest=lowest)
  genres = r.columns["movie_genres"]
  assert r.item_id.shape == r.score.shape == r.title.shape == genres.shape == (
      1, num_movies + 5)
  pad = r.item_id[0] < 0
  assert pad.sum() == 5 and pad[-5:].all() and (pad == ~r.valid[0]).all()
  assert np.isneginf(r.score[0][pad]).all() and np.isfinite(r.score[0][~pad]).all()
  assert r.title[0][pad].tolist() == [""] * 5  # was the title of catalogue row 0
  assert genres[0][-5:].tolist() == [""] * 5
  assert all(t and g for t, g in zip(r.title[0][~pad], genres[0][:num_movies]))
  assert len(r.rows(0)) == num_movies
  rated = rec.rated([3])[0]
  r = rec.recommend(feats, num_movies, exclude_ids=[rated], lowest=lowest)
  pad = r.item_id[0] < 0
  assert pad.sum() == len(rated) and not set(r.item_id[0][~pad].tolist()) & set(rated.tolist())
  assert set(r.title[0][pad].tolist()) == {""}
  assert not any(r.columns["movie_genres"][0][-len(rated):])


@pytest.mark.parametrize("name", ["query_params.npz", "candidates.npz", "users.npz",
                                  "encoders.npz"])
def test_empty_file_is_reported_as_corrupt(trained, tmp_path, name):
  workdir, _ = trained
  broken = tmp_path / "empty"
  shutil.copytree(workdir / "serving", broken)
  (broken / name).write_bytes(b"")  # used to raise EOFError
  with pytest.raises(serving.ServingError) as e:
    serving.load(broken)
  assert f"Serving directory {broken} is corrupt: " in str(e.value)
  assert name in str(e.value) and "retrain into a fresh workdir" in str(e.value)
