"""One thin Typer script per DVC stage (dvc.yaml). Messages printed with rich are not wrapped at
the console's width (80 columns when output is not a terminal, as under DVC), so a one-line error
stays one line in a log."""

import rich

rich.reconfigure(soft_wrap=True)
