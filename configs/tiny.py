"""A CPU-friendly configuration that trains in seconds (tests import it)."""

from twotower_jax.config import base_config


def get_config():
  c = base_config()
  c.name = "tiny"
  c.data.split = "random"
  c.features.num_time_buckets = 20
  c.model.mlp = (16, 8)
  c.model.time_dim = 4
  c.model.title_dim = 8
  c.model.occupation_dim = 4
  c.model.genre_dim = 4
  c.train.batch_size = 128
  c.train.num_epochs = 2
  c.train.checkpoint_every_steps = 5
  c.train.progress = False
  c.eval.batch_size = 256
  return c
