"""What the user just did: their last 50 movies (mean-pooled, or self-attention with the
``:attention`` variant) against the movie's id, title words and genres.

    python -m twotower_jax.main --config configs/history.py --workdir runs/history
    python -m twotower_jax.main --config configs/history.py:attention --workdir runs/h_att

Splits (``--config.data.split=``): the global temporal 90/10 split by default; histories
are leak-free on every split (only interactions strictly before each one).
"""

from twotower_jax import spec
from twotower_jax.config import base_config


def get_config(arg: str = "mean"):
  c = base_config()
  c.name = "history"
  c.data.split = "temporal"
  c.data.test_fraction = 0.1
  c.features.query = {
      "history": spec.history("movie_id", max_len=50, dim=64, encoder=arg),
  }
  c.features.candidate = {
      "movie": spec.id("movie_id", dim=64),
      "genres": spec.multi_hot("movie_genres", dim=16),
  }
  c.model.mlp = (128, 64)
  c.loss.logq = "counts"
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 0.002
  c.train.batch_size = 1024
  c.train.num_epochs = 6
  return c
