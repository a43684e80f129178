"""Stage normalize: the constant scale with E||x||^2 = d (paper Appendix A.1) -> JSON.

    python -m stages.normalize --params params.yaml [--store data/activations.zarr]
        [--out data/normalization.json]

Reads the ``normalize:`` section (fields: :class:`hsae_core.data.config.NormalizeConfig`); if the
params hold an ``extract:`` section, the store must have been written for its model and layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from hsae_core.common.console import rprint

from hsae_core.data.config import ExtractConfig, NormalizeConfig, read_params_section
from hsae_core.data.normalize import estimate_normalization
from hsae_core.data.store import open_store

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    params: Optional[Path] = typer.Option(None,
                                          help="params.yaml whose `normalize:` section is read"),
    store: str = typer.Option("data/activations.zarr",
                              help="activation store (path or fsspec URL)"),
    out: Path = typer.Option(Path("data/normalization.json"), help="JSON artifact to write"),
    n_tokens: Optional[int] = typer.Option(None, help="train rows sampled"),
    seed: Optional[int] = typer.Option(None),
) -> None:
    overrides = {"n_tokens": n_tokens, "seed": seed}
    try:
        cfg = NormalizeConfig.from_dict(read_params_section(params, "normalize")
                                        | {k: v for k, v in overrides.items() if v is not None})
        extract = read_params_section(params, "extract")
        want = ExtractConfig.from_dict(extract) if extract else None
        info = open_store(store, model=want and want.model, layer=want and want.layer)
        norm = estimate_normalization(info, cfg)
    except ValueError as err:
        rprint(f"[red]normalize: {err}[/red]")
        raise typer.Exit(2) from err
    norm.save(out)
    rprint(f"wrote {out}: scale {norm.scale:.6g} (E||x||^2 = {norm.mean_squared_norm:.6g} over "
           f"{norm.n_sample_tokens} train rows, d = {norm.d_model})")


if __name__ == "__main__":
    app()
