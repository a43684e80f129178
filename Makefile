.PHONY: setup test repro ablations seed-study bench
# Stages run `python -m stages.<name>` (dvc.yaml): the project's .venv comes first on PATH.
export PATH := $(CURDIR)/.venv/bin:$(PATH)

setup:
	bash scripts/setup.sh

test: setup
	.venv/bin/python -m pytest -q

# Ends with a verdict per headline metric and difference: inside or outside the committed seed
# study's spread (docs/seed-study.md); without results/seed_study.json, `dvc metrics diff`.
# The raw diff against the committed run, every row: `dvc metrics diff`.
repro: setup
	.venv/bin/dvc repro
	.venv/bin/python -m stages.seed_study verdict

ablations: setup
	.venv/bin/python -m stages.ablations queue
	.venv/bin/dvc queue start -j 1

# The seed study (docs/seed-study.md): about 15-25 min per new seed on 2 cores; resumable.
seed-study: setup
	.venv/bin/python -m stages.seed_study run
	.venv/bin/python -m stages.seed_study collect

bench: setup
	.venv/bin/python benchmarks/step_time.py
