"""The rows experiments/task_report.py has written keep their keys as RestoreConfig grows
(pipeline.identity_fields; a resumed report never redoes them)."""

import glob
import json
import os
import sys

import pytest

from dipjax import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

ROWS = sorted(glob.glob(os.path.join(ROOT, "docs", "results", "tasks", "*.jsonl")))


@pytest.mark.parametrize("path", ROWS, ids=os.path.basename)
def test_written_rows_keep_their_keys(path):
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  assert rows
  for row in rows:
    spec = {k: row[k] for k in ("section", "setting", "image", "method", "crop")}
    spec["config"] = pipeline.identity_fields(pipeline.RestoreConfig(**row["config"]))
    if "observed" in row:
      spec["observed"] = pipeline.identity_fields(pipeline.RestoreConfig(**row["observed"]))
    assert common.row_key(spec) == row["key"], (row["setting"], row["image"], row["method"])
