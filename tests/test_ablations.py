"""The ablation table (hsae_core.pipeline.ablations) with and without issue 26's third arm: HSAE -
Matryoshka beside the two arms' columns where an entry's metrics have ``diff_matryoshka``, ``-``
where they do not, never a crash; rows saved before the third arm still make a frame."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from hsae_core.pipeline import ablations
from hsae_core.pipeline import experiments as ex
from tests.test_seed_study import DIFFS_MAT, exp_show, metrics_json

HAMMING = "HSAE - Matryoshka Hamming"
POOLED = "HSAE - Matryoshka P(p|c) pooled"


def shows(matryoshka=(0,)) -> list[dict]:
    """`dvc exp show --json`: the reference (seed 0's metrics; the third arm's where 0 is in
    ``matryoshka``), a running experiment (left out) and rho-0.1 (before the third arm)."""
    out = exp_show(matryoshka=matryoshka)
    out[1]["experiments"] = out[1]["experiments"][-2:]
    return out


def test_rows_with_and_without_the_matryoshka(tmp_path):
    rows = ablations.experiment_rows(shows())
    assert [r["name"] for r in rows] == ["main", "rho-0.1"]
    ref, abl = rows
    mat = metrics_json(0, matryoshka=True)["diff_matryoshka"]
    assert ref[HAMMING] == DIFFS_MAT["hamming"][0] == mat["hamming"]
    assert ref[f"{HAMMING} lo"] == mat["hamming_lo"] and ref[f"{HAMMING} hi"] == mat["hamming_hi"]
    assert ref[f"{HAMMING} lo"] < ref[HAMMING] < ref[f"{HAMMING} hi"]
    assert ref["HSAE - Matryoshka P(p|c)"] == DIFFS_MAT["p_pc"][0]
    assert ref[POOLED] == mat["p_pc_pooled"]
    assert all(abl[c] is None for c, _ in ablations.MATRYOSHKA_COLUMNS)

    frame = ablations.frame(rows)
    assert frame.loc[0, HAMMING] == pytest.approx(-0.5)
    assert frame.loc[0, f"{POOLED} hi"] == pytest.approx(mat["p_pc_pooled_hi"])
    assert math.isnan(frame.loc[1, HAMMING]) and math.isnan(frame.loc[1, f"{HAMMING} lo"])
    shown = ablations.shown(frame)
    # the Markdown: the arms' columns, then the differences; intervals in the CSV only
    assert list(shown.columns)[-4:] == ["post-hoc P(c|p)", HAMMING, "HSAE - Matryoshka P(p|c)",
                                        POOLED]
    assert list(shown[HAMMING]) == ["-0.5000", "-"]
    assert list(shown["Hamming"]) == [ex.fmt(v) for v in frame["Hamming"]]
    md, csv = ex.write_table(frame, tmp_path / "t.md", shown)
    pd.testing.assert_frame_equal(pd.read_csv(csv), frame, check_dtype=False)
    lines = md.read_text().splitlines()
    assert "HSAE - Matryoshka P(p\\|c) pooled" in lines[0]
    assert [c.strip() for c in lines[3].strip("| ").split(" | ")][-3:] == ["-", "-", "-"]
    assert [c.strip() for c in lines[2].strip("| ").split(" | ")][-3] == "-0.5000"


def test_entries_before_the_third_arm_show_dashes_not_a_crash():
    rows = ablations.experiment_rows(shows(matryoshka=()))
    table = ablations.format_rows(rows)
    lines = table.splitlines()
    assert len(lines) == 4 and HAMMING in lines[0]
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[-3:] == ["-", "-", "-"] and cells[2] != "-"
    # rows saved before the third arm (the report's --ablations JSON) hold COLUMNS alone
    saved = [{"name": "main", "changed": {}} | {c: 1.0 for c, _ in ablations.COLUMNS}]
    frame = ablations.frame(saved)
    assert frame.loc[0, "Hamming"] == 1.0 and math.isnan(frame.loc[0, POOLED])
    assert list(ablations.shown(frame).loc[0])[-3:] == ["-", "-", "-"]
