"""benchmarks/step_counts.py at toy size: it runs on the CPU and reports what the sync test
(tests/test_sync_count.py) bounds."""

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("step_counts", BENCH / "step_counts.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_step_counts_at_toy_size(tmp_path):
    out = load().main(["--d", "32", "--sizes", "64,128,256,512", "--batch", "128", "--l0", "8",
                       "--json", str(tmp_path / "c.json")])
    row = out["64,128,256,512"]
    assert row["hsae"]["syncs"] <= 5 and row["independent"]["syncs"] <= 2
    # the HSAE's coupling work dispatches more ops than the levels alone
    assert row["hsae"]["ops"] > row["independent"]["ops"] > 0
    assert (tmp_path / "c.json").stat().st_size > 0
