"""Config validation, hierarchy assignment variants, co-activation EMA, sparsity controller."""

import pytest
import torch

from hsae_core.common import device
from hsae_core.common.device import native_autocast
from hsae_core.common.errors import ConfigError
from hsae_core.model.config import HSAEConfig
from hsae_core.model.forest import Forest
from hsae_core.model.hierarchy import CoactivationEMA, assign_children, assign_forest, top_parents
from hsae_core.model.jumprelu import JumpReLULevel, SparseCode
from hsae_core.model.sparse_ops import SupportPattern
from hsae_core.model.sparsity import SparsityController

GOOD = dict(d_model=8, level_sizes=(4, 8, 16), target_l0=2)


@pytest.mark.parametrize("field,value,allowed", [
    ("level_sizes", (8, 8, 16), "strictly increasing"),
    ("level_sizes", (16, 8), "strictly increasing"),
    ("level_sizes", (), "non-empty"),
    ("swap_rate", 1.5, "0 <= r <= 1"),
    ("swap_rate", -0.1, "0 <= r <= 1"),
    ("rho", -1.0, "rho >= 0"),
    ("target_l0", 0, "0 < target L0"),
    ("target_l0", 4, "smallest level size"),
    ("similarity", "cosine", "one of ('encoder', 'decoder', 'coactivation')"),
    ("tree", "ternary", "one of ('partial', 'full', 'binary', 'fixed')"),
    ("exclude_quantile", 1.0, "0 <= q < 1"),
    ("lr", 0.0, "positive"),
    ("warmup_frac", 1.0, "warmup_frac < 1"),
    ("adam_betas", (0.0, 1.0), "two numbers in [0, 1)"),
    ("autocast_dtype", "float8", "auto (bfloat16 where the device runs it natively)"),
    ("device", "tpu", "cpu, cuda"),
    ("update_interval", -5, ">= 0"),
    ("d_model", 0, "positive integer"),
])
def test_bad_config_values_name_field_value_and_allowed(field, value, allowed):
    with pytest.raises(ConfigError) as err:
        HSAEConfig(**{**GOOD, field: value})
    msg = str(err.value)
    shown = list(value) if isinstance(value, tuple) else value  # sequences are shown as lists
    assert f"HSAEConfig.{field} = {shown!r}" in msg
    assert allowed in msg


def test_autocast_auto_is_bfloat16_where_the_device_runs_it_natively(monkeypatch):
    """Issue 23: ``auto`` resolves at construction, so the saved config records what trained:
    bf16 on a CPU with AVX512-BF16 or AMX (this machine's own answer first), fp32 elsewhere,
    never on mps; an explicit dtype or null is kept."""
    native = device._cpu_has_native_bf16()
    cfg = HSAEConfig(**GOOD, autocast_dtype="auto")
    assert cfg.autocast_dtype == ("bfloat16" if native else None)
    assert HSAEConfig.from_dict(cfg.to_dict()) == cfg
    for avx512_bf16, amx, want in [(True, False, "bfloat16"), (False, True, "bfloat16"),
                                   (False, False, None)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert native_autocast("cpu") == want
        assert HSAEConfig(**GOOD, autocast_dtype="auto").autocast_dtype == want
        assert HSAEConfig(**GOOD, autocast_dtype="bfloat16").autocast_dtype == "bfloat16"
        assert HSAEConfig(**GOOD).autocast_dtype is None
    assert native_autocast("mps") is None
    if not torch.cuda.is_available():
        assert native_autocast("cuda") is None


def test_autocast_auto_on_cuda_is_bf16_from_ampere_on(monkeypatch):
    """A V100 or T4 emulates bf16 (``is_bf16_supported`` still says yes): fp32 there. The
    device probes are faked (the tests run without a GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    for capability, want in [((7, 0), None), ((7, 5), None), ((8, 0), "bfloat16"),
                             ((9, 0), "bfloat16")]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d, c=capability: c)
        assert native_autocast("cuda") == want and native_autocast("cuda:1") == want


def test_autocast_auto_reads_the_cpu_flags_where_torch_has_no_probe(monkeypatch, tmp_path):
    """An older torch has no ``torch.cpu._is_avx512_bf16_supported`` (pyproject allows 2.4):
    Linux's flags answer."""
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    for flags, want in [("fpu avx2 avx512f avx512_bf16", True), ("fpu avx2 amx_tile", True),
                        ("fpu avx2 avx512f", False)]:
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
        assert device._cpu_has_native_bf16(str(info)) is want
    assert device._cpu_has_native_bf16(str(tmp_path / "absent")) is False


def test_config_round_trips_through_dict_and_rejects_unknown_keys():
    cfg = HSAEConfig(**GOOD, rho=0.3, tree="binary")
    assert HSAEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['rhoo'\]"):
        HSAEConfig.from_dict({**cfg.to_dict(), "rhoo": 0.1})
    assert HSAEConfig(**GOOD, rho=0, swap_rate=0).is_independent


def test_partial_tree_excludes_the_bottom_quantile():
    sims = torch.arange(10, dtype=torch.float32)[:, None] / 10  # child j's best similarity j/10
    cands = torch.tensor([[j % 3] for j in range(10)])
    parent_of = assign_children(sims, cands, 3, exclude_quantile=0.2)
    assert parent_of[:2].tolist() == [-1, -1]  # bottom 20%
    assert parent_of[2:].tolist() == [j % 3 for j in range(2, 10)]
    full = assign_children(sims, cands, 3, exclude_quantile=0.0)
    assert (full >= 0).all()


def test_binary_tree_caps_children_at_two_and_prefers_the_most_similar():
    # five children all prefer parent 0; parent 1 is everyone's second choice
    sims = torch.tensor([[0.9, 0.5], [0.8, 0.4], [0.7, 0.3], [0.6, 0.2], [0.5, 0.1]])
    cands = torch.tensor([[0, 1]] * 5)
    parent_of = assign_children(sims, cands, 2, exclude_quantile=0.0, max_children=2)
    assert parent_of.tolist() == [0, 0, 1, 1, -1]


def test_assign_forest_picks_the_max_cosine_parent():
    gen = torch.Generator().manual_seed(0)
    parent = JumpReLULevel(6, 5, 0.1, gen)
    child = JumpReLULevel(6, 12, 0.1, gen)
    truth = torch.randint(0, 5, (12,), generator=gen)
    with torch.no_grad():
        child.W_enc.copy_(parent.W_enc[truth] + 0.05 * torch.randn(12, 6, generator=gen))
    forest = assign_forest([parent, child], "encoder", exclude_quantile=0.0)
    assert forest.parent_of[0].tolist() == truth.tolist()
    sims, ids = top_parents(child.W_enc, parent.W_enc, 2)
    assert sims.shape == (12, 2) and bool((sims[:, 0] >= sims[:, 1]).all())


def test_coactivation_ema_equals_the_naive_per_step_ema():
    gen = torch.Generator().manual_seed(0)
    sizes, m, B = (3, 5), 0.9, 6
    ema = CoactivationEMA(sizes, momentum=m, tokens=B)
    ema.RESCALE = 7  # exercise the rescaling
    naive = torch.zeros(3, 5)
    for _ in range(25):
        acts = [torch.rand(B, n, generator=gen) < 0.4 for n in sizes]
        codes = []
        for a in acts:
            p = SupportPattern.from_mask(a)
            codes.append(SparseCode(p, torch.ones(p.nnz), torch.tensor(0.0)))
        ema.update(codes)
        joint = acts[0].float().t() @ acts[1].float() / B
        naive = m * naive + (1 - m) * joint
    assert torch.allclose(ema.frequencies(0), naive, atol=1e-6)


def test_sparsity_controller_lowers_lambda_when_l0_falls_too_fast():
    ctl = SparsityController(2, target_l0=10, eta=0.001, momentum=0.999, lambda_init=1.0, rate=0.1)
    ctl.update(torch.tensor([50.0, 50.0]))
    ctl.update(torch.tensor([5.0, 60.0]))  # level 0 collapses below target, level 1 stays dense
    assert ctl.lambdas[0] < 1.0 < ctl.lambdas[1]


def test_forest_rejects_inconsistent_shapes_and_ids():
    with pytest.raises(ValueError, match=r"parent_of\[0\] has shape"):
        Forest((2, 4), [torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(ValueError, match="outside"):
        Forest((2, 4), [torch.tensor([0, 1, 2, -1])])
    f = Forest((2, 4), [torch.tensor([0, 0, -1, 1])])
    assert f.n_children(0).tolist() == [2, 1] and f.children(0, 0) == [0, 1]
    assert Forest.from_dict(f.to_dict()).equals(f)
