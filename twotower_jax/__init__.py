"""twotower_jax: a JAX/Flax two-tower retrieval recommender."""

__version__ = "0.1.0"
