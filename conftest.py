"""Fixtures every test module can use: a model with random weights, as safetensors and ONNX.

Random weights are enough where behaviour is tested (parity, plumbing,
failures); the demo weights' accuracy is checked by their own tests.
"""

import os
import subprocess
import sys

import pytest


@pytest.fixture
def without_torch():
    """``run(code, **env)``: Python code in a fresh interpreter where ``import torch`` fails, as on a Lambda."""
    def run(code: str, **env):
        # torch set to None in sys.modules makes any `import torch` raise ImportError
        subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = None\n" + code],
                       check=True, env={**os.environ, **env})
    return run


@pytest.fixture(scope="session")
def random_weights(tmp_path_factory):
    import torch

    from cai.model.astromae import AstroMAE
    from cai.model.weights import save_weights

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "random.safetensors"
    save_weights(AstroMAE().state_dict(), path, dtype="float32", metadata={"model_version": "random-seed0"})
    return path


@pytest.fixture(scope="session")
def onnx_model(random_weights, request):
    """Exported once per machine: the export (~20-60 s) is cached under .pytest_cache by the weights' sha256."""
    from cai.model import engine

    os.environ.setdefault(engine.CACHE_ENV, str(request.config.cache.mkdir("cai-onnx")))
    return engine.cached_onnx(random_weights)
