"""What ./run.sh trains: what the user just did (their last 20 movies, mean-pooled, looked up
in the candidate tower's movie table) against the movie's id, all its genres, title words
and release year; trained well.

Against configs/seed.py: the query tower reads the user's history instead of demographics
(a brand-new user is served from a few movies, without retraining); the candidate tower
sees a movie's id, genres (a bag), title words and release year; the loss applies the logQ
correction; Adam; a seeded random 80/20 split, 10% of training held out for validation:
scored after every epoch (exclude_history HR@100), the best epoch's parameters are kept and
training stops 2 epochs without a gain. The hyper-parameters were chosen on validation
(benchmarks/search_history.py; BENCHMARKS.md).

    python -m twotower_jax.main --config configs/default.py --workdir runs/default
    python -m twotower_jax.main --config configs/default.py:temporal --workdir runs/default_t
"""

from twotower_jax import spec
from twotower_jax.config import base_config


def get_config(arg: str = "random"):
  c = base_config()
  c.name = "default"
  c.data.split = arg  # random (80/20) | temporal (90/10) | user_temporal (20%) | ...
  c.data.test_fraction = 0.1 if arg == "temporal" else 0.2
  c.data.validation_fraction = 0.1
  c.features.query = {
      # the history's movies are looked up in the candidate tower's movie table (one table)
      "history": spec.history("movie_id", max_len=20, dim=64, encoder="mean", share="movie"),
  }
  c.features.candidate = {
      "movie": spec.id("movie_id", dim=64),
      "genres": spec.multi_hot("movie_genres", dim=16),  # all of a movie's genres
      "title_words": spec.text("movie_title", dim=32, max_words=8, max_size=20_000),
      "release_year": spec.categorical("movie_release_year", dim=8),
  }
  c.model.mlp = (128, 64)
  c.loss.logq = "counts"
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 0.002
  c.train.batch_size = 1024
  c.train.num_epochs = 20
  c.train.patience = 2
  c.train.early_stopping_metric = "exclude_history/hr_100"
  return c
