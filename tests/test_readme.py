"""The README's statements that can drift: the size of each file, and the two commands."""
import os
import re

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
