"""Test-wide settings: the repo root on sys.path, and the hypothesis profiles of the property-based tests.

The default profile ("ci") is derandomized: the same examples on every run, so CI cannot go red by
luck; it does not shrink a failing example (each one is a run), it reports it as drawn. `HYPOTHESIS_PROFILE=explore python -m pytest tests/test_bad_input.py` draws new random examples,
many more of them, to hunt for inputs that break the bad-input contract.
"""

import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, Phase, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the scripts are files in the repo root

_common = {"deadline": None, "database": None, "suppress_health_check": [HealthCheck.too_slow,
                                                                          HealthCheck.function_scoped_fixture]}
# No shrinking in CI: each example is a training run, and a failure is reported at once, as drawn.
settings.register_profile("ci", derandomize=True, phases=[Phase.explicit, Phase.generate], **_common)
settings.register_profile("explore", derandomize=False, max_examples=500, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
