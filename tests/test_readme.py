"""The README's statements that can drift: the size of each file, the two commands, and every command the docs show."""
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_file_sizes_stated_in_readme_hold():
    stated = re.findall(r"^\| `(\w+\.py)` \|.*\| ≤ (\d+) lines \|$", readme(), flags=re.M)
    assert len(stated) >= 7
    for name, limit in stated:
        path = os.path.join(ROOT, name)
        assert os.path.isfile(path), f"the README lists {name}, which does not exist"
        with open(path, encoding="utf-8") as f:
            assert sum(1 for _ in f) <= int(limit), f"{name} has outgrown the README's '≤ {limit} lines'"


def test_readme_commands_match_ci():
    text = readme()
    assert 'python engine.py --prompt "' in text
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    assert "python -m pytest -q tests" in text and "pytest -q tests" in ci
    assert "requirements.txt" in ci and "requirements-data.txt" in ci


def documented_commands():
    """Each `python SCRIPT.py ...` in README.md, EVAL.md and BENCHMARKS.md, but those with a '...' placeholder."""
    found = []
    for doc in ("README.md", "EVAL.md", "BENCHMARKS.md"):
        with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
            text = f.read()
        for cmd in re.findall(r"`python3?\s((?:engine|eval|train_hash|bench)\.py(?:\s[^`]*)?)`", text):  # (wrapped too)
            if "..." not in cmd and "--help" not in cmd:
                found.append((doc, " ".join(cmd.split())))
    return found


def test_documented_commands_parse(monkeypatch):
    """A renamed or removed flag makes the docs' commands fail: every one must still pass its script's parser (with
    one CUDA device, as --device cuda checks the machine)."""
    import torch
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    import bench
    import engine
    import eval as evaluate
    import train_hash
    parse = {"engine.py": engine.build_parser().parse_args, "eval.py": evaluate.parse_args,
             "train_hash.py": train_hash.build_parser().parse_args, "bench.py": bench.build_parser()[0].parse_args}
    commands = documented_commands()
    assert len(commands) >= 30
    for doc, cmd in commands:
        script, *argv = shlex.split(cmd)
        try:
            parse[script](argv)
        except SystemExit:
            pytest.fail(f"{doc}: `python {cmd}` no longer parses")
