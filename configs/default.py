"""What ./run.sh trains. Starts equal to the seed configuration."""

from twotower_jax.config import base_config


def get_config():
  c = base_config()
  c.name = "default"
  return c
