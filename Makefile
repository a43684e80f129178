.PHONY: setup test repro ablations bench
# Stages run `python -m stages.<name>` (dvc.yaml): the project's .venv comes first on PATH.
export PATH := $(CURDIR)/.venv/bin:$(PATH)

setup:
	bash scripts/setup.sh

test: setup
	.venv/bin/python -m pytest -q

repro: setup
	.venv/bin/dvc repro
	.venv/bin/dvc metrics diff

ablations: setup
	.venv/bin/python -m stages.ablations queue
	.venv/bin/dvc queue start -j 1

bench: setup
	.venv/bin/python benchmarks/step_time.py
