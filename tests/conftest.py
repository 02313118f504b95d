import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))


@pytest.fixture
def shared_dir():
    if not SHARED.exists():
        pytest.skip("../shared is not beside this checkout")
    return SHARED
