"""User histories against a slow reference: windows before a time, and online histories."""

import numpy as np

from twotower_jax import history


def random_log(rng, n=400, users=12, items=30):
  return (rng.integers(0, users, n), rng.integers(0, items, n),
          rng.integers(0, 50, n).astype(np.int64))  # many equal times: ties matter


def reference_window(user, item, time, u, t, length):
  rows = [i for i in range(len(user)) if user[i] == u and time[i] < t]
  rows.sort(key=lambda i: (time[i], i))
  got = [int(item[i]) for i in rows][-length:]
  return [-1] * (length - len(got)) + got


def test_windows_hold_the_last_items_strictly_before_each_time():
  rng = np.random.default_rng(0)
  user, item, time = random_log(rng)
  seqs = history.sequences(user, item, time, num_users=12)
  qu, qt = rng.integers(0, 12, 200), rng.integers(-5, 60, 200)
  w = history.windows(seqs, qu, history.ends(seqs, qu, qt), 7)
  for b in range(200):
    assert w[b].tolist() == reference_window(user, item, time, qu[b], qt[b], 7)


def test_online_history_is_training_plus_earlier_test_items():
  rng = np.random.default_rng(1)
  user, item, time = random_log(rng)
  is_test = rng.random(len(user)) < 0.3
  tr, te = ~is_test, is_test
  indptr, items = history.online_history(user[tr], item[tr], user[te], item[te], time[te], 12)
  tu, ti, tt = user[te], item[te], time[te]
  for j in range(len(tu)):
    rows = np.arange(len(tu))
    earlier = (tt < tt[j]) | ((tt == tt[j]) & (rows < j))  # ties by row order
    want = sorted(item[tr][user[tr] == tu[j]].tolist() + ti[(tu == tu[j]) & earlier].tolist())
    assert sorted(items[indptr[j]:indptr[j + 1]].tolist()) == want


def test_no_window_holds_its_own_item_or_anything_at_or_after_its_time():
  rng = np.random.default_rng(2)
  user, item, time = random_log(rng, n=300)
  item = np.arange(300)  # every interaction its own item: a leak would show
  seqs = history.sequences(user, item, time, num_users=12)
  w = history.windows(seqs, user, history.ends(seqs, user, time), 50)
  for n in range(300):
    seen = w[n][w[n] >= 0]
    assert n not in seen and (time[seen] < time[n]).all()
