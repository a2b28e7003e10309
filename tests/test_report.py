"""The multi-run report: grouping, mean ± std over seeds, PNG and markdown."""

import json
import re

import pytest

from twotower_jax import report


def write_run(path, config, split, seed, hr10, pop_hr10=None, **extra):
  path.mkdir(parents=True)
  m = {"config": config, "split": split, "seed": seed, "backend": "cpu",
       "examples_per_second": None, "train_seconds": 12.5,
       "include_seen/hr_10": hr10, "exclude_seen/hr_10": hr10 + 0.1,
       "include_seen/mrr": hr10 / 10, "exclude_seen/mrr": hr10 / 5, "top_10_accuracy": hr10}
  if pop_hr10 is not None:
    m.update({"popularity/include_seen/hr_10": pop_hr10,
              "popularity/exclude_seen/hr_10": pop_hr10 + 0.01,
              "popularity/include_seen/mrr": 0.01, "popularity/exclude_seen/mrr": 0.02})
  m.update(extra)
  (path / "metrics.json").write_text(json.dumps(m))
  return str(path)


def test_write_report_groups_and_aggregates(tmp_path):
  dirs = [write_run(tmp_path / "a0", "small", "random", 0, 0.1, 0.05),
          write_run(tmp_path / "a1", "small", "random", 1, 0.3, 0.07),
          write_run(tmp_path / "b0", "small", "temporal", 0, 0.5)]
  png, table = report.write_report(dirs, str(tmp_path / "out"))
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert (tmp_path / "out" / "report.md").read_text() == table
  lines = table.splitlines()
  assert lines[0] == ("| config | split | seeds | protocol | metric | model | popularity | random "
                      "| itemcf | ease |")
  # hr_10 over seeds: model (0.1, 0.3) -> 0.2 ± 0.1414 (ddof=1); popularity 0.06 ± 0.0141.
  assert ("| small | random | 2 | include_seen | hr_10 | 0.2000 ± 0.1414 | 0.0600 ± 0.0141 "
          "| – | – | – |") in lines
  assert ("| small | random | 2 | exclude_seen | hr_10 | 0.3000 ± 0.1414 | 0.0700 ± 0.0141 "
          "| – | – | – |") in lines
  assert ("| small | random | 2 | include_seen | mrr | 0.0200 ± 0.0141 | 0.0100 ± 0.0000 "
          "| – | – | – |") in lines
  # A single seed shows the mean alone; absent baselines show a dash.
  assert "| small | temporal | 1 | include_seen | hr_10 | 0.5000 | – | – | – | – |" in lines
  # Runs without exclude_history metrics: only the two other protocols.
  assert len(lines) == 2 + 2 * 2 * 2  # header + 2 groups x 2 protocols x (hr_10, mrr)


def test_write_report_metric_selection_and_partial_baselines(tmp_path):
  dirs = [write_run(tmp_path / "a0", "small", "random", 0, 0.1, 0.05),
          write_run(tmp_path / "a1", "small", "random", 1, 0.3)]
  _, table = report.write_report(dirs, str(tmp_path / "out"), metrics=["hr_10"])
  assert ("| small | random | 2 | include_seen | hr_10 | 0.2000 ± 0.1414 | 0.0500 (n=1) | – | – "
          "| – |") in table
  assert "mrr" not in table
  with pytest.raises(ValueError, match="in none of the runs"):
    report.write_report(dirs, str(tmp_path / "out"), metrics=["hr_20"])


def test_write_report_rejects_bad_runs(tmp_path):
  a = write_run(tmp_path / "a", "small", "random", 0, 0.1)
  b = write_run(tmp_path / "b", "small", "random", 0, 0.2)
  with pytest.raises(ValueError, match="pass each run once"):
    report.write_report([a, b], str(tmp_path / "out"))
  with pytest.raises(FileNotFoundError, match="train that run first"):
    report.write_report([str(tmp_path / "missing")], str(tmp_path / "out"))
  (tmp_path / "c").mkdir()
  (tmp_path / "c" / "metrics.json").write_text(json.dumps({"config": "x", "split": "random"}))
  where = tmp_path / "c" / "metrics.json"
  with pytest.raises(ValueError, match=re.escape(f"{where} lacks ['seed']")):
    report.write_report([str(tmp_path / "c")], str(tmp_path / "out"))
  (tmp_path / "d").mkdir()
  (tmp_path / "d" / "metrics.json").write_text(json.dumps({"seed": 0}))
  with pytest.raises(ValueError, match=r"lacks \['config', 'split'\]"):
    report.write_report([str(tmp_path / "d")], str(tmp_path / "out"))
  with pytest.raises(ValueError, match="no workdirs"):
    report.write_report([], str(tmp_path / "out"))


def test_report_and_summary_show_exclude_history_when_present(tmp_path, capsys):
  extra = {"exclude_history/hr_10": 0.25, "exclude_history/mrr": 0.05,
           "ease/exclude_history/hr_10": 0.3, "ease/include_seen/hr_1": 0.1,
           "include_seen/hr_1": 0.05, "popularity/include_seen/hr_1": 0.01,
           "popularity/exclude_history/hr_10": 0.04}
  dirs = [write_run(tmp_path / "a0", "small", "temporal", 0, 0.1, 0.05, **extra)]
  _, table = report.write_report(dirs, str(tmp_path / "out"), metrics=["hr_10"])
  assert ("| small | temporal | 1 | exclude_history | hr_10 | 0.2500 | 0.0400 | – | – "
          "| 0.3000 |") in table.splitlines()
  report.print_summary(json.loads((tmp_path / "a0" / "metrics.json").read_text()))
  out = capsys.readouterr().out
  assert "online history excluded" in out
  history_part = out.split("online history excluded")[1]
  assert "ease" in history_part and "0.3000" in history_part
