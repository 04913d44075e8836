import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """The embedded default model: 2 layers, hidden 256, head_dim 64."""
    from vllm_kvsparse import tiny_model as tm
    return tm.build(str(tmp_path_factory.mktemp("tiny-qwen2vl")))


@pytest.fixture(scope="session")
def peaked_model(tmp_path_factory) -> str:
    """4 layers with sharpened attention: ZipVL keeps clearly fewer tokens at tau 0.9."""
    from vllm_kvsparse import tiny_model as tm
    return tm.build(str(tmp_path_factory.mktemp("peaked-qwen2vl")),
                    tm.TinyModelSpec(layers=4, qk_scale=6.0))
