"""The notebook's exact feature set (demographics + time; title + first genre), trained well.

What changes against configs/seed.py is training only: the logQ correction (in-batch
softmax otherwise punishes popular movies for being popular), Adam, and early stopping: 10%
of the training interactions are held out for validation (the latest 10% on temporal
splits, a seeded random 10% otherwise), scored after every epoch, and the best epoch's
parameters are kept. Every hyper-parameter here was chosen on validation, and the same
config serves every split, so no split-specific variant is needed:

    python -m twotower_jax.main --config configs/demographic.py --workdir runs/demographic
    python -m twotower_jax.main --config configs/demographic.py --workdir runs/demo_t \\
        --config.data.split=temporal --config.data.test_fraction=0.1
"""

from twotower_jax.config import base_config


def get_config():
  c = base_config()
  c.name = "demographic"
  c.data.split = "random"  # seeded 80/20; temporal (90/10), user_temporal, ... by flag
  c.data.test_fraction = 0.2
  c.data.validation_fraction = 0.1
  c.loss.logq = "counts"
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 0.003
  c.train.num_epochs = 20
  c.train.patience = 3  # early stopping picks the epoch
  return c
