"""A CPU-friendly configuration that trains in seconds (tests import it).

Variants (``--config configs/tiny.py:VARIANT``): ``user_id`` adds the user id to the query
tower; ``all`` also gives the candidate tower all genres, title words and release year;
``history`` adds the user's last 10 movies (mean-pooled; ``attention``: self-attention).
"""

from twotower_jax import spec
from twotower_jax.config import base_config


def get_config(arg: str = ""):
  c = base_config()
  c.name = "tiny"
  c.data.split = "random"
  c.features.query = {
      "age": spec.numeric("raw_user_age"),
      "gender": spec.categorical("user_gender", dim=2),
      "occupation": spec.categorical("user_occupation_text", dim=4),
      "time": spec.timestamp("timestamp", buckets=20, dim=4),
  }
  c.features.candidate = {
      "title": spec.id("movie_title", dim=8),
      "genre": spec.multi_hot("movie_genres", dim=4, max_values=1),
  }
  if arg in ("user_id", "all"):
    c.features.query = {"user_id": spec.id("user_id", dim=8), **c.features.query.to_dict()}
  if arg == "all":
    c.features.candidate.genre.max_values = 0
    c.features.candidate["title_words"] = spec.text("movie_title", dim=4)
    c.features.candidate["release_year"] = spec.categorical("movie_release_year", dim=4)
  if arg in ("history", "attention"):
    c.features.query["history"] = spec.history("movie_id", max_len=10, dim=8,
                                               encoder="mean" if arg == "history" else arg)
  c.model.mlp = (16, 8)
  c.train.batch_size = 128
  c.train.num_epochs = 2
  c.train.checkpoint_every_steps = 5
  c.train.progress = False
  c.eval.batch_size = 256
  return c
