.PHONY: setup test repro bench
setup:
	bash scripts/setup.sh

test: setup
	.venv/bin/python -m pytest -q

repro: setup
	.venv/bin/dvc repro

bench: setup
	.venv/bin/python benchmarks/step_time.py
