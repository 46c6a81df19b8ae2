"""Test-wide settings: the repo root on sys.path, and the hypothesis profiles of the property-based tests.

The default profile ("ci") is derandomized: the same examples on every run, so CI cannot go red by
luck; it does not shrink a failing example (each one is a run), it reports it as drawn. `HYPOTHESIS_PROFILE=explore python -m pytest tests/test_bad_input.py` draws new random examples,
many more of them, to hunt for inputs that break the bad-input contract.
"""

import gzip
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, settings

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
