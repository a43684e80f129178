"""benchmarks/train_digest.py: the digest that shows a refactor leaves training unchanged is
itself reproducible (two runs in one process agree), and it sees a change in training."""

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "train_digest.py"


def load():
    spec = importlib.util.spec_from_file_location("train_digest", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_digest", mod)
    spec.loader.exec_module(mod)
    return mod


def test_digest_is_reproducible_and_sees_a_change():
    mod = load()
    a = mod.digest("merged", steps=30)  # one hierarchy update (step 25), swaps and PC after it
    assert a == mod.digest("merged", steps=30)
    assert mod.digest("merged", steps=29)["state"] != a["state"]
