"""Shared fixtures: tiny random-weight checkpoints written to temp dirs (the real HF loading path, no hub)."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.testing import make_tiny_model
from tests.support import RAY_TEST_ENV


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), arch="llama")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """One checkpoint per supported architecture, plus Llama variants (tied embeddings, llama3 rope scaling)."""
    variants = {
        "llama": ("llama", {}),
        "qwen2": ("qwen2", {}),
        "qwen3": ("qwen3", {}),
        "mistral": ("mistral", {}),
        "llama-tied": ("llama", {"tie_word_embeddings": True}),
        "llama3-rope": (
            "llama",
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 256,
                }
            },
        ),
    }
    return {
        name: make_tiny_model(tmp_path_factory.mktemp(name), arch=arch, **kw) for name, (arch, kw) in variants.items()
    }


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray per test module (2 CPUs; workers use one torch thread each), shut down after the module."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=RAY_TEST_ENV)
    yield
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: run `make test-gpu` on the GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
