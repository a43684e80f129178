"""``device: auto`` (issue 24): every device key of params.yaml accepts it, it resolves in one
place (hsae_core.common.device) to ``cuda`` when torch sees a CUDA device and to ``cpu``
otherwise, every config class holds the resolved device (so use sites, check-params' device
check and the memory limits see a concrete one), and check-params accepts a params.yaml with
``auto`` everywhere."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import yaml
from typer.testing import CliRunner

from hsae_core.common.device import resolve_device, resolve_device_field
from hsae_core.common.errors import ConfigError
from hsae_core.data.config import ExtractConfig
from hsae_core.evaluation.compute import MetricsConfig
from hsae_core.evaluation.evidence import EvidenceConfig
from hsae_core.judge.pairs import JudgeConfig
from hsae_core.model.config import HSAEConfig
from hsae_core.pipeline.params import hsae_config, load_params, validate_params
from hsae_core.site.config import ReportConfig
from stages import check_params
from stages.check_params import SECTIONS
from tests.pipeline_helpers import REPO

#: Every section of params.yaml with a device key, and its class.
DEVICE_SECTIONS = {"extract": ExtractConfig, "metrics": MetricsConfig,
                   "evidence": EvidenceConfig, "judge": JudgeConfig, "report": ReportConfig}
EXPECTED = "cuda" if torch.cuda.is_available() else "cpu"


def test_auto_resolves_to_cuda_when_torch_sees_one_else_cpu(monkeypatch):
    assert resolve_device("auto") == EXPECTED
    for name in ("cpu", "cuda", "cuda:1", "mps"):
        assert resolve_device(name) == name  # a named device is never changed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"


@pytest.mark.parametrize("cls", [*DEVICE_SECTIONS.values(), HSAEConfig])
def test_every_config_class_holds_the_resolved_device(cls):
    extra = ({"d_model": 8, "level_sizes": (4, 8), "target_l0": 2.0} if cls is HSAEConfig
             else {})
    cfg = cls(device="auto", **extra)
    assert cfg.device == EXPECTED
    assert dataclasses.asdict(cfg)["device"] == EXPECTED  # what a saved config records
    assert cls(device="cpu", **extra).device == "cpu"
    with pytest.raises(ConfigError, match=r"expected auto, cpu, cuda, cuda:N or mps"):
        cls(device="gpu", **extra)


def test_resolve_device_field_names_the_field():
    class Fake:
        device = "tpu"

    with pytest.raises(ConfigError, match=r"Fake.device = 'tpu' is invalid: expected auto"):
        resolve_device_field(Fake())


def auto_params() -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params = copy.deepcopy(params)
    for section in (*DEVICE_SECTIONS, "sae"):
        params[section]["device"] = "auto"
    return params


def test_check_params_accepts_auto_everywhere(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(auto_params(), sort_keys=False))
    loaded = load_params(path)
    assert validate_params(loaded, SECTIONS) == []
    assert hsae_config(loaded, 16).device == EXPECTED
    assert hsae_config(loaded, 16, independent=True).device == EXPECTED
    out = tmp_path / "params.checked"
    result = CliRunner().invoke(check_params.app, ["--params", str(path), "--out", str(out),
                                                   "--store", str(tmp_path / "no-store")])
    assert result.exit_code == 0, result.output
    assert "is valid" in result.output and out.is_file()


def test_check_params_names_a_bad_device_with_auto_among_the_choices(tmp_path):
    params = auto_params()
    params["report"]["device"] = "gpu"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    found = validate_params(load_params(path), SECTIONS)
    assert found == ["report.device = 'gpu' is invalid: expected auto, cpu, cuda, cuda:N or mps"]
