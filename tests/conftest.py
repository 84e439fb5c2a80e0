"""Shared test setup: offline Hugging Face, the project root on sys.path, ../shared data."""
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Real data and tokenizer files live beside the project, not in it (a user's clone lacks them).
SHARED_DATA = ROOT.parent / "shared" / "data"


def shared_path(*parts):
    """A path under ../shared/data, or skip the test with the reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found: these tests need the shared data folder beside the project")
    return path
