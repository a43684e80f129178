"""One thin Typer script per DVC stage (dvc.yaml); their messages go through
hsae_core.common.console, which keeps a one-line error one line under DVC."""
