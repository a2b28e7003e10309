"""Ids only: the user id against the title id and first genre, for sources without
demographics (ml-20m, ml-25m, ml-latest, synthetic).

    python -m twotower_jax.main --config configs/ids.py:ml-25m --workdir runs/ml25m \
        --config.data.dir=PATH
    python -m twotower_jax.main --config configs/ids.py --workdir runs/synthetic \
        --config.data.synthetic_items=1000000 --config.data.synthetic_interactions=10000000
"""

from twotower_jax import spec
from twotower_jax.config import base_config


def get_config(source: str = "synthetic"):
  c = base_config()
  c.name = "ids"
  c.data.source = source
  c.data.split = "random"
  c.features.query = {"user_id": spec.id("user_id", dim=32)}
  c.features.candidate = {"title": spec.id("movie_title", dim=32),
                          "genre": spec.multi_hot("movie_genres", dim=8, max_values=1)}
  return c
