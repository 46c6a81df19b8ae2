"""Test-wide settings: one CPU thread per process, the repo root on sys.path, and the hypothesis profiles.

The suite runs in parallel (pyproject.toml: `-n auto --dist loadfile`, one pytest worker per core, a test
file per worker), so every test process and every process it starts gets one OpenMP thread: PyTorch's
default of one thread per core would have each process's threads spin-waiting for cores that another
worker holds. The multi-process tests stay in one file (test_distributed.py), so they never run beside each
other; only test_docs.py's quickstart commands (two of them `accelerate launch`) may run beside one of them.

The default profile ("ci") is derandomized: the same examples on every run, so CI cannot go red by
luck; it does not shrink a failing example (each one is a run), it reports it as drawn.
`HYPOTHESIS_PROFILE=explore python -m pytest tests/test_bad_input.py` draws new random examples,
many more of them, to hunt for inputs that break the bad-input contract.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch or numpy is imported; subprocesses inherit it

import gzip  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the scripts are files in the repo root

_common = {"deadline": None, "database": None, "suppress_health_check": [HealthCheck.too_slow,
                                                                          HealthCheck.function_scoped_fixture]}
# No shrinking in CI: each example is a training run, and a failure is reported at once, as drawn.
settings.register_profile("ci", derandomize=True, phases=[Phase.explicit, Phase.generate], **_common)
settings.register_profile("explore", derandomize=False, max_examples=500, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def small_cmapss(tmp_path_factory) -> Path:
    """FD001 cut to training engines 1-10 and test engines 1-5, in the original text format: quick runs."""
    folder = tmp_path_factory.mktemp("cmapss")
    read = {name: np.loadtxt(gzip.open(REPO / f"data/cmapss/{name}_FD001.txt.gz"), ndmin=2)
            for name in ("train", "test", "RUL")}
    layout = ["%d", "%d"] + ["%.4f"] * 24
    np.savetxt(folder / "train_FD001.txt", read["train"][read["train"][:, 0] <= 10], fmt=layout)
    np.savetxt(folder / "test_FD001.txt", read["test"][read["test"][:, 0] <= 5], fmt=layout)
    np.savetxt(folder / "RUL_FD001.txt", read["RUL"][:5], fmt="%d")
    return folder
