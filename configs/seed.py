"""The TFRS MovieLens-100K notebook, reproduced.

Query tower: normalized age, gender embedding (dim 2), occupation embedding, time as a
1,000-bucket embedding plus the normalized timestamp. Candidate tower: title embedding and the
first genre's embedding. Both end in an MLP [64, 32, 16]. In-batch softmax, Adagrad 0.1,
batch 2048, 5 epochs; split: seeded random 80,000 train / 10,000 test.

    python -m twotower_jax.main --config configs/seed.py --workdir /tmp/seed

Every key and its default is in twotower_jax/config.py (base_config); the defaults are this
notebook's settings.
"""

from twotower_jax.config import base_config


def get_config():
  c = base_config()
  c.name = "seed"
  return c
