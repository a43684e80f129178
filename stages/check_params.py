"""Stage check-params: the whole params.yaml checked before any other stage runs.

    python -m stages.check_params [--params params.yaml] [--out data/params.checked]
        [--store data/activations.zarr]

Every other stage depends on ``--out``, so ``dvc repro`` runs this one first; DVC removes a
stage's outputs only when it runs that stage, so a typo stops the pipeline here and no output
is touched. It checks every top-level key (unknown ones are named), every key, type and range
of every section (hsae_core.pipeline.params) and the devices, then the limits a later stage
would hit (hsae_core.pipeline.limits): ``sae.batch_size`` against the train split (``--store``
when it holds this extraction, else ``extract.max_tokens``), the model's layers and context,
and the memory each training and evaluation stage needs against its device's. ``--out``
always holds the same text: a change of params re-runs this stage but, through it, nothing
else. Under DVC every later stage refuses to run if params.yaml no longer holds the values
this stage checked (hsae_core.pipeline.params.guard_pipeline).
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from hsae_core.common import fsio
from hsae_core.common.errors import ConfigError
from hsae_core.data.config import ExtractConfig, NormalizeConfig
from hsae_core.evaluation.compute import MetricsConfig
from hsae_core.evaluation.evidence import EvidenceConfig
from hsae_core.judge.pairs import JudgeConfig
from hsae_core.model.posthoc import PosthocConfig
from hsae_core.pipeline.limits import check_limits
from hsae_core.pipeline.matryoshka_run import MatryoshkaParams
from hsae_core.pipeline.params import (
    check_unchanged,
    load_params,
    section_config,
    validate_params,
)
from hsae_core.pipeline.train_run import TrainRunConfig
from hsae_core.site.config import ReportConfig

#: Each section's class; ``sae``, ``hierarchy``, ``rho`` and ``r`` are HSAEConfig's (params.py).
SECTIONS = {"extract": ExtractConfig, "normalize": NormalizeConfig, "train": TrainRunConfig,
            "posthoc": PosthocConfig, "matryoshka": MatryoshkaParams, "metrics": MetricsConfig,
            "evidence": EvidenceConfig, "judge": JudgeConfig, "report": ReportConfig}
MARK = ("params.yaml passed stages/check_params.py. Every stage depends on this file, so DVC runs "
        "that check first; its text never changes.\n")
RESTORE = ("Nothing was run and no output was removed. (Outputs that an earlier, interrupted run "
           "left missing come back with `dvc checkout`.)")

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
    out: Path = typer.Option(Path("data/params.checked"),
                             help="marker that every other stage depends on"),
    store: Path = typer.Option(Path("data/activations.zarr"),
                               help="activation store whose size bounds sae.batch_size (when it "
                                    "holds the extraction params.yaml asks for)"),
) -> None:
    try:
        loaded = load_params(params)
        problems = validate_params(loaded, SECTIONS)
        if not problems:
            configs = {name: section_config(loaded, name, cls) for name, cls in SECTIONS.items()}
            problems = check_limits(loaded, configs, store)
        if not problems:
            check_unchanged("check-params")
    except ConfigError as err:
        problems = [str(err)]
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        print(f"check-params: {params} is invalid:\n{lines}\nFix it and rerun. {RESTORE}",
              file=sys.stderr)
        raise typer.Exit(2)
    fsio.write_text(out, MARK)
    print(f"check-params: {params} is valid")


if __name__ == "__main__":
    app()
