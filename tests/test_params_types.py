"""Issue 15, findings 8-10: every params.yaml value is taken strictly by type (a hand-written
``3e-3``, which PyYAML reads as a string, is the number meant), an unknown key anywhere stops the
pipeline, and values that pass a range check but cannot run (infinite, a device this machine
lacks) are refused by the validator, before any work: all through check-params, the first
stage."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from typer.testing import CliRunner

from hsae_core.common.errors import ConfigError
from hsae_core.pipeline.params import hsae_config, load_params, validate_params
from stages import check_params
from stages.check_params import SECTIONS
from tests.pipeline_helpers import REPO

BASE = yaml.safe_load((REPO / "params.yaml").read_text())


def problems(tmp_path, edit) -> list[str]:
    params = copy.deepcopy(BASE)
    edit(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return validate_params(load_params(path), SECTIONS)


def put(section, **values):
    def edit(p):
        if section is None:
            p.update(values)
        else:
            p[section].update(values)
    return edit


@pytest.mark.parametrize("section, key, value, named", [
    (None, "rho", True, "rho = true is invalid: expected a finite number"),
    (None, "rho", "abc", "rho = 'abc' is invalid"),
    (None, "rho", float("inf"), "rho = inf is invalid: expected a finite number"),
    (None, "r", float("nan"), "r = nan is invalid"),
    ("sae", "level_sizes", [8.9, 16], "sae.level_sizes = [8.9, 16] is invalid: expected a list "
                                      "of integers"),
    ("sae", "level_sizes", "8,16", "sae.level_sizes = '8,16' is invalid"),
    ("sae", "total_steps", 40.5, "sae.total_steps = 40.5 is invalid: expected an integer"),
    ("sae", "batch_size", True, "sae.batch_size = true is invalid"),
    ("metrics", "bootstrap", "many", "metrics.bootstrap = 'many' is invalid"),
    ("extract", "layer", 1.5, "extract.layer"),
])
def test_a_value_of_the_wrong_type_is_named(tmp_path, section, key, value, named):
    found = problems(tmp_path, put(section, **{key: value}))
    assert len(found) == 1 and named in found[0], found


def test_a_hand_written_float_is_the_number_meant(tmp_path):
    text = (REPO / "params.yaml").read_text().replace("lr: 3.0e-3 ", "lr: 3e-3 ")
    assert isinstance(yaml.safe_load(text)["sae"]["lr"], str)  # PyYAML's reading of 3e-3
    (tmp_path / "params.yaml").write_text(text)
    params = load_params(tmp_path / "params.yaml")
    assert validate_params(params, SECTIONS) == []
    assert hsae_config(params, 576).lr == 3e-3


def test_unknown_keys_and_missing_devices_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown top-level key\(s\) 'hierarchie' \(did "
                                          r"you mean 'hierarchy'\?\)"):
        problems(tmp_path, put(None, hierarchie={"tree": "full"}))
    found = problems(tmp_path, put("judge", n_pairz=3))
    assert len(found) == 1 and "judge.n_pairz" in found[0]
    if not torch.cuda.is_available():
        found = problems(tmp_path, put("sae", device="cuda"))
        assert len(found) == 1 and "sae.device = 'cuda': this machine has no CUDA device" in (
            found[0])


def test_check_params_stage_stops_with_every_problem_and_writes_nothing(tmp_path):
    params = copy.deepcopy(BASE)
    params["rho"], params["sae"]["total_steps"] = float("inf"), 40.5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = tmp_path / "params.checked"
    args = ["--params", str(tmp_path / "params.yaml"), "--out", str(out)]
    result = CliRunner().invoke(check_params.app, args)
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "rho = inf" in text and "sae.total_steps = 40.5" in text
    assert "dvc checkout" in text and not out.exists()
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    assert CliRunner().invoke(check_params.app, args).exit_code == 0
    first = out.read_bytes()
    params["rho"], params["sae"]["total_steps"] = 0.1, 40  # valid, other values: same marker
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert CliRunner().invoke(check_params.app, args).exit_code == 0
    assert out.read_bytes() == first
