"""The HTML page at ``GET /``: a form and a table of recommendations, rendered on the server.

No JavaScript: the form submits with GET to the same page, so every answer has its own
URL (``/?user_id=42&k=10``). Pick a known user (their stored features and history), or
type query features and a few item ids as a history; the page lists the recommended
titles with their other display columns (genres, ...) and scores. ``render`` builds the
page from the Recommender, the form's fields and the results ``service.py`` computed.
"""

from __future__ import annotations

import html
from typing import Any, Mapping

import numpy as np

from twotower_jax import features as feat
from twotower_jax import serving

_STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:2rem auto;
max-width:1100px;color:#1d2330;background:#f7f8fa;padding:0 1rem}
h1{font-size:1.5rem;margin:0 0 .2rem}.sub{color:#5a6275;margin:0 0 1.2rem}
form{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:1rem 1.2rem;
display:grid;grid-template-columns:repeat(auto-fill,minmax(230px,1fr));gap:.7rem 1rem}
label{display:flex;flex-direction:column;font-size:.85rem;color:#394055;gap:.25rem}
label small{color:#7a8294}
input{font:inherit;padding:.35rem .5rem;border:1px solid #c5cbd6;border-radius:5px}
.row{grid-column:1/-1;display:flex;gap:1rem;align-items:center}
.check{flex-direction:row;align-items:center;gap:.4rem}
button{font:inherit;background:#2457c5;color:#fff;border:0;border-radius:5px;
padding:.45rem 1.2rem;cursor:pointer}
table{width:100%;border-collapse:collapse;margin-top:1.2rem;background:#fff;
border:1px solid #dde1e8;border-radius:8px;overflow:hidden}
th,td{text-align:left;padding:.45rem .7rem;border-bottom:1px solid #eceef2;font-size:.92rem}
th{background:#eef1f6;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
.tag{display:inline-block;background:#e8eefb;color:#2a4a8f;border-radius:4px;
padding:0 .35rem;margin:0 .2rem .1rem 0;font-size:.8rem}
.error{background:#fdecec;border:1px solid #f3b5b5;color:#8a1f1f;padding:.7rem 1rem;
border-radius:6px;margin-top:1rem}.note{color:#5a6275;margin-top:1rem}
footer{margin-top:1.5rem;color:#7a8294;font-size:.85rem}a{color:#2457c5}
"""
_MAX_CHOICES = 300  # known users / category values offered in a datalist


def _e(value: Any) -> str:
  return html.escape("" if value is None else str(value), quote=True)


def _hint(rec: serving.Recommender, name: str, spec) -> tuple[str, list]:
  """A short description of a feature's accepted values, and values to offer."""
  enc = rec.encoders[name]
  if spec.kind in ("numeric", "timestamp"):
    lo_hi = feat.value_range(enc)
    what = "number" if spec.kind == "numeric" else "Unix time (s)"
    if lo_hi is None:
      return what, []
    lo, hi = (f"{x:.0f}" if spec.kind == "timestamp" else f"{x:g}" for x in lo_hi)
    return f"{what}, {lo} to {hi} in training", []
  if "vocab" in enc:
    vocab = enc["vocab"]
    return f"{spec.kind}, {len(vocab)} known values", vocab[:_MAX_CHOICES].tolist()
  return spec.kind, []


def _datalist(name: str, values: list) -> str:
  options = "".join(f'<option value="{_e(v)}">' for v in values)
  return f'<datalist id="dl-{_e(name)}">{options}</datalist>' if values else ""


def _field(label: str, name: str, value: str, hint: str, choices: list = ()) -> str:
  listattr = f' list="dl-{_e(name)}"' if choices else ""
  return (f'<label>{_e(label)} <small>{_e(hint)}</small>'
          f'<input name="{_e(name)}" value="{_e(value)}"{listattr}>'
          f'{_datalist(name, list(choices))}</label>')


def _form(rec: serving.Recommender, params: Mapping[str, str]) -> str:
  users = rec.users["user_key"]
  fields = [_field("Known user", "user_id", params.get("user_id", ""),
                   f"{rec.user_key}: {len(users)} known users", users[:_MAX_CHOICES].tolist())]
  history = rec.history_columns()
  seen = set()
  for name, spec in rec.specs.items():
    column = spec.column
    if spec.kind == "history" or column in seen or column == rec.user_key:
      continue
    seen.add(column)
    hint, choices = _hint(rec, name, spec)
    fields.append(_field(column, column, params.get(column, ""), hint, choices))
  if history:
    fields.append(_field("History", "history", params.get("history", ""),
                         "item ids, most recent last, e.g. 50,181,1"))
  fields.append(_field("How many", "k", params.get("k", "10"), "1 to 1000"))
  checked = " checked" if params.get("exclude_rated", "on" if not params else "") in (
      "1", "on", "true") else ""
  return ('<form method="get" action="/">' + "".join(fields) +
          '<div class="row"><label class="check"><input type="checkbox" name="exclude_rated"'
          f'{checked}>Leave out what the user has (training items, the history)</label>'
          '<button type="submit">Recommend</button></div></form>')


def _table(rec: serving.Recommender, items: list[dict]) -> str:
  title = rec.meta.get("title_column", "")
  extra = [c for c in rec.items if c != title]
  head = "".join(f"<th>{_e(c)}</th>" for c in extra)
  tags = {c for c in extra if any("|" in str(item.get(c, "")) for item in items)}
  rows = []
  for rank, item in enumerate(items, start=1):
    cells = []
    for c in extra:
      v = item.get(c)
      if c in tags and isinstance(v, str):
        cells.append("<td>" + "".join(f'<span class="tag">{_e(t)}</span>'
                                      for t in v.split("|") if t) + "</td>")
      elif isinstance(v, float) and float(v).is_integer():
        cells.append(f"<td>{int(v)}</td>")
      else:
        cells.append(f"<td>{_e(v)}</td>")
    name = item.get(title, item["item_id"]) if title else item["item_id"]
    score = "" if item["score"] is None else f"{item['score']:.3f}"
    rows.append(f'<tr><td class="num">{rank}</td><td>{_e(name)}</td>'
                f'<td class="num">{_e(item["item_id"])}</td>{"".join(cells)}'
                f'<td class="num">{score}</td></tr>')
  if not rows:
    return '<p class="note">No items left to recommend.</p>'
  return (f'<table><thead><tr><th>#</th><th>{_e(title or "item")}</th><th>id</th>{head}'
          f'<th>score</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')


def render(rec: serving.Recommender, params: Mapping[str, str], items: list[dict] | None,
           error: str | None) -> str:
  """The whole page: the form (filled with ``params``), then ``error`` or ``items``."""
  name = rec.meta.get("config_name") or "model"
  sample = np.asarray(rec.users["user_key"][:5]).tolist()
  examples = " ".join(f'<a href="/?user_id={_e(u)}">{_e(u)}</a>' for u in sample)
  body = ""
  if error:
    body = f'<div class="error">{_e(error)}</div>'
  elif items is not None:
    who = params.get("user_id") or "this query"
    body = f'<p class="note">Top {len(items)} for {_e(who)}:</p>' + _table(rec, items)
  else:
    body = f'<p class="note">Pick a known user (e.g. {examples}) or type features.</p>'
  return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
          f"<title>Recommendations: {_e(name)}</title><style>{_STYLE}</style></head><body>"
          f"<h1>Recommendations</h1><p class=\"sub\">Model <b>{_e(name)}</b>, "
          f"{len(rec.item_ids_N):,} items, {len(rec.users['user_key']):,} known users.</p>"
          f"{_form(rec, params)}{body}"
          '<footer>JSON API: POST /recommend, GET /items/ID/similar, '
          '<a href="/metadata">/metadata</a>, <a href="/healthz">/healthz</a>.</footer>'
          "</body></html>")
