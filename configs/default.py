"""What ./run.sh trains: the best features, user id included, trained well.

Against configs/seed.py: the user id joins the query tower; the candidate tower sees all of
a movie's genres (a bag), its title words and release year; the loss applies the logQ
correction; Adam; a seeded random 80/20 split.

    python -m twotower_jax.main --config configs/default.py --workdir runs/default
"""

from twotower_jax import spec
from twotower_jax.config import base_config


def get_config(arg: str = "random"):
  c = base_config()
  c.name = "default"
  c.data.split = arg  # random (80/20) | temporal (90/10) | leave_last_out | seed
  c.data.test_fraction = 0.1 if arg == "temporal" else 0.2
  c.features.query = {"user_id": spec.id("user_id", dim=32), **c.features.query.to_dict()}
  c.features.candidate = {
      "title": spec.id("movie_title", dim=32),
      "genres": spec.multi_hot("movie_genres", dim=8),  # all of a movie's genres
      "title_words": spec.text("movie_title", dim=32, max_words=8, max_size=20_000),
      "release_year": spec.categorical("movie_release_year", dim=8),
  }
  c.loss.logq = "counts"
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 0.003
  c.train.batch_size = 1024  # half the in-batch softmax cost per example of 2048, as good
  c.train.num_epochs = 10
  return c
