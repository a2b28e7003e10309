"""Your own data, by example: the shop that examples/shop_data.py generates (not MovieLens).

    python examples/shop_data.py --out data/shop
    python -m twotower_jax.main --config configs/shop.py --workdir runs/shop \
        --config.data.dir=data/shop

Three tables: events (customer, sku, ts, quantity), items (sku, category, brand, tags,
price, name) and users (customer, country, age). ``configs/shop.py:csv`` reads the CSV
files instead of the Parquet ones.
"""

from twotower_jax import spec
from twotower_jax.config import base_config


def get_config(arg: str = "parquet"):
  c = base_config()
  c.name = "shop"
  c.data.source = "tables"
  c.data.interactions_file = f"events.{arg}"
  c.data.items_file = f"items.{arg}"
  c.data.users_file = f"users.{arg}"
  c.data.user_key, c.data.item_key, c.data.time_key = "customer", "sku", "ts"
  c.data.split = "temporal"
  c.data.test_fraction = 0.1
  c.features.query = {
      "customer": spec.id("customer", dim=16),
      "country": spec.categorical("country", dim=4),
      "age": spec.numeric("age", buckets=5, dim=4),
      "ts": spec.timestamp("ts", buckets=50, dim=8),
  }
  c.features.candidate = {
      "sku": spec.id("sku", dim=16),
      "category": spec.categorical("category", dim=8),
      "brand": spec.categorical("brand", dim=4),
      "tags": spec.multi_hot("tags", sep="|", dim=8),
      "price": spec.numeric("price", log=True),
      "name": spec.text("name", max_words=4, dim=8),
  }
  c.serve.title_column = "name"
  c.model.mlp = (64, 32)
  c.loss.logq = "counts"
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 0.003
  c.train.batch_size = 512
  c.train.num_epochs = 5
  c.train.progress = False
  return c
