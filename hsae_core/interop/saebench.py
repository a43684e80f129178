"""SAEBench adapter: every exported level (hsae_core.interop.saelens) as an SAEBench custom SAE.

SAEBench's custom-SAE contract (``sae_bench.custom_saes.base_sae.BaseSAE``): an ``nn.Module``
with ``W_enc [d_in, d_sae]``, unit-norm ``W_dec [d_sae, d_in]``, ``b_enc``, ``b_dec``,
``encode`` / ``decode`` / ``forward``, ``device`` and ``dtype`` attributes and a ``cfg``
(``CustomSAEConfig``: model_name, d_in, d_sae, hook_layer, hook_name, context_size, ...).
:class:`JumpReLULevelSAE` subclasses ``BaseSAE`` when ``sae_bench`` is installed, so SAEBench's
evals accept it as is; without it the same class is a plain module honouring the same contract
(what the tests check). Checked by hand against sae-bench 0.6.0 (installed ``--no-deps`` beside
sae-lens 6.54 in a scratch venv): the class is a ``BaseSAE`` and SAEBench's own
``load_and_format_sae`` (decoder-norm check, cfg standardisation) accepts every level, as it
accepts the export loaded with SAELens. SAEBench's evals need internet and a GPU: not run here.

Run SAEBench on every level (internet for the model and eval datasets, a GPU)::

    pip install sae-bench
    python -m stages.saebench_eval --export data/export --evals core,sparse_probing \\
        --model-name gemma-2-2b --device cuda --llm-dtype bfloat16 --out eval_results

The model name must be one TransformerLens loads (SAEBench runs the LM through it); the
embedded default's SmolLM2 GGUF is not, so this is for hub-model runs (configs/paper.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_bytes
from torch import nn

from hsae_core.common import fsio
from hsae_core.interop.saelens import SAELENS_CONFIG, SAELENS_WEIGHTS

try:  # the real base class and config when SAEBench is installed
    from sae_bench.custom_saes.base_sae import BaseSAE as _Base
    from sae_bench.custom_saes.custom_sae_config import CustomSAEConfig as _Config
    HAVE_SAEBENCH = True
except ImportError:  # the same contract without SAEBench
    _Base, _Config, HAVE_SAEBENCH = nn.Module, None, False

EVALS = ("core", "sparse_probing", "absorption", "scr", "tpp", "autointerp")


@dataclass
class _LocalConfig:
    """The fields of SAEBench's ``CustomSAEConfig`` that its evals read."""

    model_name: str
    d_in: int
    d_sae: int
    hook_layer: int
    hook_name: str
    context_size: int | None = None
    hook_head_index: int | None = None
    architecture: str = "jumprelu"
    apply_b_dec_to_input: bool = False
    prepend_bos: bool = True
    normalize_activations: str = "none"
    dtype: str = "float32"
    device: str = "cpu"
    dataset_path: str = ""
    model_from_pretrained_kwargs: dict = field(default_factory=dict)


class JumpReLULevelSAE(_Base):
    """One exported level in SAEBench's custom-SAE form:
    ``encode(x) = ReLU(pre) * (pre > threshold)`` with ``pre = x W_enc + b_enc`` on raw
    activations, ``decode(a) = a W_dec + b_dec``."""

    def __init__(self, d_in: int, d_sae: int, model_name: str, hook_layer: int,
                 device: torch.device | str, dtype: torch.dtype, hook_name: str | None = None):
        hook_name = hook_name or f"blocks.{hook_layer}.hook_resid_post"
        if HAVE_SAEBENCH:
            super().__init__(d_in, d_sae, model_name, hook_layer, torch.device(device), dtype,
                             hook_name)
        else:
            super().__init__()
            self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae))
            self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in))
            self.b_enc = nn.Parameter(torch.zeros(d_sae))
            self.b_dec = nn.Parameter(torch.zeros(d_in))
            self.cfg = _LocalConfig(model_name, d_in, d_sae, hook_layer, hook_name)
        self.threshold = nn.Parameter(torch.zeros(d_sae))
        self.cfg.architecture = "jumprelu"
        self.cfg.dtype = str(dtype).split(".")[-1]
        self.device, self.dtype = torch.device(device), dtype
        nn.Module.to(self, device=device, dtype=dtype)

    @classmethod
    def from_export(cls, folder: str | Path, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> "JumpReLULevelSAE":
        """Load a level folder written by :func:`hsae_core.interop.saelens.export_saelens`."""
        folder = fsio.as_location(folder)
        cfg = fsio.read_json(fsio.join(folder, SAELENS_CONFIG))
        md = cfg["metadata"]
        sae = cls(cfg["d_in"], cfg["d_sae"], md["model_name"], md["hook_layer"], device, dtype,
                  md["hook_name"])
        state = load_bytes(fsio.read_bytes(fsio.join(folder, SAELENS_WEIGHTS)))
        with torch.no_grad():
            for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
                getattr(sae, name).copy_(state[name].to(device=device, dtype=dtype))
        sae.cfg.context_size = md.get("context_size")
        sae.cfg.dataset_path = md.get("dataset_path", "")
        return sae

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = x.to(self.dtype) @ self.W_enc + self.b_enc
        return torch.relu(pre) * (pre > self.threshold)

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        return feature_acts @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    if not HAVE_SAEBENCH:
        @torch.no_grad()
        def check_decoder_norms(self) -> bool:
            """Unit-norm decoder rows (SAEBench's check, same tolerances)."""
            norms = self.W_dec.norm(dim=1)
            tol = 1e-2 if self.W_dec.dtype in (torch.bfloat16, torch.float16) else 1e-5
            return bool(torch.allclose(norms, torch.ones_like(norms), atol=tol))


def saebench_selection(export_root: str | Path, kinds: tuple[str, ...] = ("hsae", "baseline"),
                       device: str = "cuda",
                       dtype: torch.dtype = torch.bfloat16) -> list[tuple[str, Any]]:
    """``[(name, sae)]`` for every level (the Matryoshka: every prefix) of every exported model
    under ``export_root``: the ``selected_saes`` list SAEBench's evals take."""
    root = fsio.as_location(export_root)
    out = []
    for kind in kinds:
        info = fsio.join(root, f"{kind}/export.json")
        if not fsio.exists(info):
            raise FileNotFoundError(f"no export at {fsio.join(root, kind)}: "
                                    "run `python -m stages.export_saelens`")
        meta = fsio.read_json(info)
        folders = meta.get("folders") or [f"level{l}" for l in range(meta["levels"])]
        for folder in folders:
            sae = JumpReLULevelSAE.from_export(fsio.join(root, f"{kind}/{folder}"), device,
                                               dtype)
            out.append((f"{kind}_{folder}_{sae.cfg.d_sae}", sae))
    return out


def run_saebench(selection: list[tuple[str, Any]], evals: list[str], model_name: str, device: str,
                 llm_dtype: str, llm_batch_size: int, output: str, api_key: str | None = None,
                 seed: int = 42) -> None:
    """Run the chosen SAEBench evals on ``selection`` (SAEBench's ``run_all_evals_custom_saes``
    pattern; results under ``output/<eval>``). Needs ``sae_bench``, internet and a GPU."""
    if not HAVE_SAEBENCH:
        raise ImportError("SAEBench is not installed: pip install sae-bench "
                          "(it needs internet and a GPU)")
    unknown = sorted(set(evals) - set(EVALS))
    if unknown:
        raise ValueError(f"unknown SAEBench eval(s) {unknown}; choose from {EVALS}")
    for name, sae in selection:
        sae.cfg.dtype = llm_dtype
    for ev in evals:
        folder = str(Path(output) / ev)
        Path(folder).mkdir(parents=True, exist_ok=True)
        if ev == "core":
            import sae_bench.evals.core.main as core
            core.multiple_evals(selected_saes=selection, n_eval_reconstruction_batches=200,
                                n_eval_sparsity_variance_batches=2000, eval_batch_size_prompts=16,
                                compute_featurewise_density_statistics=True,
                                compute_featurewise_weight_based_metrics=True,
                                exclude_special_tokens_from_reconstruction=True,
                                dataset="Skylion007/openwebtext", context_size=128,
                                output_folder=folder, verbose=True, dtype=llm_dtype, device=device)
        elif ev == "sparse_probing":
            import sae_bench.evals.sparse_probing.main as sp
            sp.run_eval(sp.SparseProbingEvalConfig(model_name=model_name, random_seed=seed,
                                                   llm_batch_size=llm_batch_size,
                                                   llm_dtype=llm_dtype),
                        selection, device, folder, False)
        elif ev == "absorption":
            import sae_bench.evals.absorption.main as ab
            ab.run_eval(ab.AbsorptionEvalConfig(model_name=model_name, random_seed=seed,
                                                llm_batch_size=llm_batch_size,
                                                llm_dtype=llm_dtype),
                        selection, device, folder, False)
        elif ev in ("scr", "tpp"):
            import sae_bench.evals.scr_and_tpp.main as st
            st.run_eval(st.ScrAndTppEvalConfig(model_name=model_name, random_seed=seed,
                                               perform_scr=ev == "scr",
                                               llm_batch_size=llm_batch_size, llm_dtype=llm_dtype),
                        selection, device, str(Path(output)), False, clean_up_activations=True)
        elif ev == "autointerp":
            if api_key is None:
                raise ValueError("autointerp needs an OpenAI API key (--api-key-file)")
            import sae_bench.evals.autointerp.main as ai
            ai.run_eval(ai.AutoInterpEvalConfig(model_name=model_name, random_seed=seed,
                                                llm_batch_size=llm_batch_size,
                                                llm_dtype=llm_dtype),
                        selection, device, api_key, folder, False)


__all__ = ["EVALS", "HAVE_SAEBENCH", "JumpReLULevelSAE", "run_saebench", "saebench_selection"]
