"""Export each level of a trained HSAE (or of the baseline, or each prefix of the Matryoshka) as a
SAELens JumpReLU SAE folder, with the forest beside them as JSON, so the field's tools (SAELens,
SAEBench, Neuronpedia-style viewers) load every level as an ordinary SAE.

Layout of ``export_saelens(model, out, meta)``::

    <out>/level<l>/cfg.json                 SAELens 6 config: architecture "jumprelu", d_in, d_sae,
                                            apply_b_dec_to_input false, normalize_activations
                                            "none", metadata {model_name, hook_name, hook_layer,
                                            context_size, prepend_bos, dataset_path, hsae {...}}
    <out>/level<l>/sae_weights.safetensors  W_enc [d, n], W_dec [n, d], b_enc [n], b_dec [d],
                                            threshold [n]
    <out>/forest.json                       parent id (or -1) of every child, per level pair
    <out>/export.json                       kind, folders, the store's metadata

``kind="matryoshka"`` (issue 26) exports the Matryoshka's *prefixes* folder
(``data/matryoshka/prefixes``, a save_hsae folder whose level g is the dictionary's first
``m_g`` latents, the pre-encoder bias folded into ``b_enc``): folder ``prefix<g>/`` is the
reconstruction from the first g+1 groups, ``metadata.hsae`` names the prefix and the group and
prefix sizes, and there is no forest.json (the prefixes have no forest; the post-hoc forest of
this arm links its *groups*, data/matryoshka_forest): export.json says so (``"forest": null``).
:func:`check_prefixes` refuses a folder whose levels are not nested prefixes (the groups
folder, say).

Activation normalisation (Appendix A.1: the model is trained on ``scale * x``) is folded into
the weights, so an exported SAE takes the *raw* residual stream: with our level's
``a = JumpReLU_theta(W_enc (s x) + b_enc)`` and ``x_hat = (W_dec^T a + b_dec) / s``, the export
has ``b_enc / s``, ``theta / s``, ``b_dec / s`` and feature activations ``a / s`` (raw units),
while ``W_enc`` and the unit-norm ``W_dec`` are unchanged (SAEBench expects unit-norm decoder
rows). SAELens's encode is ``ReLU(pre) * (pre > threshold)`` with ``pre = x W_enc + b_enc``
(``apply_b_dec_to_input`` false, as in our encoder): equal to ours since thresholds are positive.
The scale is also declared in ``metadata.hsae.activation_scale``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hsae_core.common import fsio
from hsae_core.model.hsae import HSAE

SAELENS_CONFIG, SAELENS_WEIGHTS, FOREST_JSON = "cfg.json", "sae_weights.safetensors", "forest.json"
EXPORT_JSON = "export.json"
#: The models the export knows: the HSAE, the baseline with its post-hoc forest, the
#: Matryoshka's nested prefixes.
KINDS = ("hsae", "baseline", "matryoshka")
#: What ``prefix<g>/`` of a Matryoshka export is (export.json, each cfg.json's metadata).
PREFIX_MEANING = ("prefix<g>/ is the Matryoshka SAE's first g+1 groups (the first prefix_sizes[g] "
                  "latents) as one JumpReLU SAE at the inference threshold: its decode is the "
                  "reconstruction from those groups alone")
#: The SAELens release whose loader (``SAE.load_from_disk``) this format is tested against; the
#: loader reads configs marked >= 6.0 as SAELens-6 configs.
SAELENS_FORMAT_VERSION = "6.54.12"


@dataclass(frozen=True)
class ExportMetadata:
    """Where the activations came from (SAELens metadata) and the normalisation scale."""

    model_name: str
    """The language model (store attribute ``model``; a hub name such as google/gemma-2-2b)."""
    hook_layer: int
    """Block whose output residual stream the SAE reads (store attribute ``layer``)."""
    context_size: int
    """Tokens per training sequence (store attribute ``context_len``)."""
    activation_scale: float
    """The normalisation scale s of data/normalization.json, folded into the weights."""
    dataset_path: str = ""
    """The corpus the activations were extracted from."""

    @property
    def hook_name(self) -> str:
        """TransformerLens's name for the residual stream after block ``hook_layer``
        (``hidden_states[layer + 1]`` in Hugging Face terms, what the store holds)."""
        return f"blocks.{self.hook_layer}.hook_resid_post"

    @classmethod
    def from_store(cls, attrs: dict, scale: float) -> "ExportMetadata":
        return cls(model_name=str(attrs["model"]), hook_layer=int(attrs["layer"]),
                   context_size=int(attrs["context_len"]), activation_scale=float(scale),
                   dataset_path=str(attrs.get("corpus", "")))


def folder_name(kind: str, level: int) -> str:
    """``prefix<g>`` for the Matryoshka's prefixes, ``level<l>`` otherwise."""
    return f"prefix{level}" if kind == "matryoshka" else f"level{level}"


def check_prefixes(model: HSAE, rtol: float = 1e-5, atol: float = 1e-6) -> tuple[int, ...]:
    """The group sizes of a Matryoshka prefixes model; ValueError unless its levels are nested
    prefixes of one dictionary (level g+1's first ``m_g`` latents are level g's: the same
    ``W_enc``, ``W_dec``, ``b_enc`` rows and threshold, the same ``b_dec``) without a forest."""
    sizes = tuple(model.cfg.level_sizes)
    problem = None
    if any(b <= a for a, b in zip(sizes, sizes[1:])):
        problem = f"level sizes {list(sizes)} do not grow"
    elif not model.forest.is_empty():
        problem = "it has a forest (the prefixes have none; the arm's forest links its groups)"
    else:
        for g, (small, big) in enumerate(zip(model.levels, model.levels[1:])):
            m = small.n_features
            pairs = [(small.W_enc, big.W_enc[:m]), (small.W_dec, big.W_dec[:m]),
                     (small.b_enc, big.b_enc[:m]), (small.threshold, big.threshold[:m]),
                     (small.b_dec, big.b_dec)]
            if not all(torch.allclose(a, b, rtol=rtol, atol=atol) for a, b in pairs):
                problem = f"level {g + 1}'s first {m} latents are not level {g}'s"
                break
    if problem:
        raise ValueError(f"not a Matryoshka prefixes model: {problem}. Pass the prefixes folder "
                         "(data/matryoshka/prefixes), not the groups (data/matryoshka/groups)")
    return tuple(b - a for a, b in zip((0,) + sizes[:-1], sizes))


def saelens_tensors(model: HSAE, level: int, scale: float) -> dict[str, torch.Tensor]:
    """One level's weights in SAELens layout and raw-activation units (module docstring)."""
    if not scale > 0:
        raise ValueError(f"activation scale must be positive, got {scale}")
    lv = model.levels[level]
    with torch.no_grad():
        out = {"W_enc": lv.W_enc.t(), "W_dec": lv.W_dec, "b_enc": lv.b_enc / scale,
               "b_dec": lv.b_dec / scale, "threshold": lv.threshold / scale}
        return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


def saelens_config(model: HSAE, level: int, meta: ExportMetadata, kind: str,
                   training: dict | None = None) -> dict:
    """SAELens 6's cfg.json of one level; ``training`` (the model's training.json) adds the
    Matryoshka's total L0 ``k``."""
    cfg = model.cfg
    mine = {"kind": kind, "level": level, "level_sizes": list(cfg.level_sizes),
            "activation_scale": meta.activation_scale,
            "normalization": "folded: inputs are raw activations, feature activations "
                             "are the trained model's divided by activation_scale",
            "target_l0": cfg.target_l0, "forest": f"../{FOREST_JSON}"}
    if kind == "matryoshka":
        sizes = list(cfg.level_sizes)
        mine = {"kind": kind, "prefix": level, "prefix_sizes": sizes,
                "group_sizes": list(check_prefixes(model)), "nested": PREFIX_MEANING,
                "activation_scale": meta.activation_scale,
                "normalization": mine["normalization"],
                "k": (training or {}).get("k"), "forest": None}
    return {
        "architecture": "jumprelu", "d_in": cfg.d_model, "d_sae": cfg.level_sizes[level],
        "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": False,
        "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None,
            "model_name": meta.model_name, "hook_name": meta.hook_name,
            "hook_layer": meta.hook_layer,
            "hook_head_index": None, "context_size": meta.context_size, "prepend_bos": True,
            "dataset_path": meta.dataset_path, "model_from_pretrained_kwargs": {},
            "hsae": mine,
        },
    }


def forest_json(model: HSAE) -> dict:
    """The forest as JSON: per level pair, the parent id in level l of each feature of l+1
    (-1 = none)."""
    forest = model.forest
    return {"format": "hsae-forest", "level_sizes": list(forest.level_sizes),
            "levels": [f"level{l}" for l in range(model.n_levels)],
            "pairs": [{"parent_level": l, "child_level": l + 1, "parent_of": p.cpu().tolist()}
                      for l, p in enumerate(forest.parent_of)]}


def export_saelens(model: HSAE, out: str | Path, meta: ExportMetadata,
                   kind: str = "hsae", training: dict | None = None) -> list[str | Path]:
    """Write every level of ``model`` as a SAELens JumpReLU folder under ``out`` (a path or fsspec
    URL) and the forest beside them; return the level folders. Each file replaces the old one
    (never rewritten in place) and is byte-identical for identical content. ``kind
    "matryoshka"``: ``model`` holds the Matryoshka's prefixes (checked), written as
    ``prefix<g>/`` without a forest (module docstring); ``training`` its training.json."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: expected one of {KINDS}")
    info: dict = {"kind": kind}
    if kind == "matryoshka":
        info |= {"prefix_sizes": list(model.cfg.level_sizes),
                 "group_sizes": list(check_prefixes(model)), "nested": PREFIX_MEANING,
                 "k": (training or {}).get("k"),
                 "forest": None, "forest_note": "none: the prefixes have no forest (the arm's "
                                                "post-hoc forest links its groups)"}
    out = fsio.as_location(out)
    folders = []
    for level in range(model.n_levels):
        folder = fsio.join(out, folder_name(kind, level))
        fsio.write_bytes(fsio.join(folder, SAELENS_WEIGHTS), fsio.safetensors_bytes(
            saelens_tensors(model, level, meta.activation_scale), {"format": "pt"}))
        fsio.write_bytes(fsio.join(folder, SAELENS_CONFIG), json.dumps(
            saelens_config(model, level, meta, kind, training), indent=2).encode())
        folders.append(folder)
    if kind != "matryoshka":
        fsio.write_bytes(fsio.join(out, FOREST_JSON), json.dumps(forest_json(model)).encode())
        info["forest"] = FOREST_JSON
    info |= {"levels": len(folders),
             "folders": [folder_name(kind, l) for l in range(model.n_levels)]}
    fsio.write_bytes(fsio.join(out, EXPORT_JSON), json.dumps(
        info | asdict(meta) | {"hook_name": meta.hook_name}, indent=2).encode())
    return folders


__all__ = ["EXPORT_JSON", "ExportMetadata", "FOREST_JSON", "KINDS", "PREFIX_MEANING",
           "SAELENS_CONFIG", "SAELENS_FORMAT_VERSION", "SAELENS_WEIGHTS", "check_prefixes",
           "export_saelens", "folder_name", "forest_json", "saelens_config", "saelens_tensors"]
