"""The notebook's exact feature set (demographics + time; title + first genre), trained well.

What changes against configs/seed.py is training only: the logQ correction (in-batch
softmax otherwise punishes popular movies for being popular), Adam and more epochs; and the
split is the seeded random 80/20 used to compare with published figures.

    python -m twotower_jax.main --config configs/demographic.py --workdir runs/demographic
    python -m twotower_jax.main --config configs/demographic.py:temporal --workdir runs/demo_t
"""

from twotower_jax.config import base_config


def get_config(arg: str = "random"):
  c = base_config()
  c.name = "demographic"
  c.data.split = arg  # random (80/20) | temporal (90/10) | leave_last_out | seed
  c.data.test_fraction = 0.1 if arg == "temporal" else 0.2
  c.loss.logq = "counts"
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 0.003
  c.train.num_epochs = 20
  if arg == "temporal":
    # Test times lie after every training time: coarser time buckets generalize better,
    # and more epochs fit the past more than they predict the future.
    c.features.query.time.buckets = 50
    c.train.num_epochs = 3
  return c
