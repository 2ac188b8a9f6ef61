import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the repository (or $MLX_GPT_SHARED_DATA): GPT-2's tokenizer files, texts."""
    d = Path(os.environ.get("MLX_GPT_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
    if not d.is_dir():
        pytest.skip(f"shared test data not found at {d} (set MLX_GPT_SHARED_DATA)")
    return d
