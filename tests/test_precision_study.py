"""benchmarks/precision_study.py: runs of another precision against the seed study's table."""

import csv
import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load():
    sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location("precision_study",
                                                  ROOT / "benchmarks" / "precision_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_reference(path: Path, seeds: list[float]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["group", "metric", "label"] + [f"seed {i}" for i in range(len(seeds))])
        w.writerow(["hsae", "fve", "FVE"] + seeds)
        w.writerow(["diff", "hamming", "Hamming"] + [-s for s in seeds])


def write_run(path: Path, fve: float) -> Path:
    path.write_text(json.dumps({"hsae": {"mean": {"fve": fve}}, "diff": {"hamming": -fve}}))
    return path


def test_a_shift_far_beyond_the_seed_spread_is_flagged_and_one_inside_is_not(tmp_path):
    mod = load()
    seeds = [0.70, 0.71, 0.72, 0.71, 0.70]
    write_reference(tmp_path / "ref.csv", seeds)
    same = [write_run(tmp_path / f"s{i}.json", v) for i, v in enumerate([0.71, 0.705, 0.715])]
    rows = {r["key"]: r for r in mod.compare(tmp_path / "ref.csv", same)}
    assert rows["hsae.fve"]["holds_zero"] and rows["diff.hamming"]["holds_zero"]
    assert rows["hsae.fve"]["diff"] == pytest.approx(0.71 - statistics.mean(seeds))
    moved = [write_run(tmp_path / f"m{i}.json", v) for i, v in enumerate([0.80, 0.81])]
    rows = {r["key"]: r for r in mod.compare(tmp_path / "ref.csv", moved)}
    assert not rows["hsae.fve"]["holds_zero"] and rows["hsae.fve"]["lo"] > 0
    # one run: a prediction interval, wider than the reference's own spread
    one = mod.compare(tmp_path / "ref.csv", [write_run(tmp_path / "one.json", 0.72)])
    fve = next(r for r in one if r["key"] == "hsae.fve")
    assert fve["holds_zero"] and fve["hi"] - fve["lo"] > 2 * statistics.stdev(seeds)


def test_the_json_report_is_written(tmp_path):
    mod = load()
    write_reference(tmp_path / "ref.csv", [0.70, 0.71, 0.72, 0.71, 0.70])
    runs = [str(write_run(tmp_path / f"s{i}.json", v)) for i, v in enumerate([0.71, 0.80])]
    rows = mod.main(["--reference", str(tmp_path / "ref.csv"), "--runs", *runs,
                     "--json", str(tmp_path / "out.json")])
    assert json.loads((tmp_path / "out.json").read_text()) == rows and rows
