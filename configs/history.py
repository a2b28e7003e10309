"""What the user just did: their last 50 movies (mean-pooled, or another encoder with a
variant) against the movie's id, title words and genres.

    python -m twotower_jax.main --config configs/history.py --workdir runs/history
    python -m twotower_jax.main --config configs/history.py:attention --workdir runs/h_att

Variants: ``mean`` (default), ``attention`` (causal self-attention, SASRec), ``gru`` (the
last hidden state of a GRU); ``attention_side`` adds, per history position, the rating the
item got and the time since it (log1p days), with dropout 0.2 in the attention blocks;
``shared`` looks the history's movies up in the candidate tower's movie table (one table).

Splits (``--config.data.split=``): the global temporal 90/10 split by default; histories
are leak-free on every split (only interactions strictly before each one).
"""

from twotower_jax import spec
from twotower_jax.config import base_config

VARIANTS = ("mean", "attention", "gru", "attention_side", "shared")


def get_config(arg: str = "mean"):
  if arg not in VARIANTS:
    raise ValueError(f"configs/history.py:{arg}: unknown variant; use one of "
                     f"{', '.join(VARIANTS)}.")
  c = base_config()
  c.name = "history"
  c.data.split = "temporal"
  c.data.test_fraction = 0.1
  history = spec.history("movie_id", max_len=50, dim=64,
                         encoder={"attention_side": "attention", "shared": "mean"}.get(arg, arg))
  if arg == "attention_side":
    history.side, history.time_since, history.dropout = ("user_rating",), True, 0.2
  if arg == "shared":
    history.share = "movie"
  c.features.query = {"history": history}
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
