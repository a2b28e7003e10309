"""MovieLens data layer: locate, parse, join and split the ratings.

Every loader returns a :class:`~twotower_jax.data.dataset.Dataset` whose columns
keep the TFDS feature names of ``movielens/100k-ratings`` and
``movielens/100k-movies``. Every data problem raises
:class:`~twotower_jax.data.dataset.DataError` whose message names the problem
and the fix.

This package imports nothing on its own; import the module you need, e.g.
``from twotower_jax.data import sources`` and then
``sources.load_dataset(config.data)``. The modules, lowest layer first:

* ``dataset``: the ``Dataset`` type, ``DataError``, the codings shared by every
  source, and the helpers they share (row selection, the title's year, text
  decoding as UTF-8 or latin-1, dropping repeated ratings).
* ``download``: finding the MovieLens 100K folder, downloading it if allowed.
* ``movielens``: the ML-100K files (u.data, u.user, u.item, u.genre) and the join.
* ``movielens_large``: ML-1M ``.dat`` files and the ML-20M/25M/latest CSV files.
* ``synthetic``: a generator of clustered interactions with Zipf popularity.
* ``tfds_source``: TFDS ``movielens/100k-ratings`` and ``-movies``.
* ``splits``: train/test splits of the ratings.
* ``sources``: the one table of every source; the config-driven entry points
  ``load_dataset`` and ``train_test``.
"""
