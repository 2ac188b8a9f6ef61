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


@pytest.fixture(scope="session")
def sp_tokenizer():
    """A small SentencePiece BPE trained on English only, so accents, CJK and emoji fall back to bytes."""
    from mlx_gpt.tokenizer import SentencePieceTokenizer

    lines = ["The quick brown fox jumps over the lazy dog.", "To be, or not to be, that is the question.",
             "All the world's a stage, and all the men and women merely players."] * 40
    return SentencePieceTokenizer.train(lines, 300)
