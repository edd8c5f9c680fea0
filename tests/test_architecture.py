"""The house rules that can be checked mechanically (docs/architecture.md, "Modules")."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# obj._name, where obj is not self/cls: a reach into another object's private state
PRIVATE_ATTRIBUTE = re.compile(r"\b(?!self\b|cls\b)([A-Za-z_][A-Za-z0-9_]*)\._[a-z][A-Za-z0-9_]*")
PRIVATE_IMPORT = re.compile(r"from engine[\w.]* import .*\b_[a-z]\w*|engine\.\w+\._[a-z]")


def test_tests_benchmarks_and_examples_use_only_public_doors():
    offenders = []
    for folder in ("tests", "bench", "examples"):
        for file in sorted((ROOT / folder).glob("**/*.py")):
            for n, line in enumerate(file.read_text().splitlines(), 1):
                code = line.split("#")[0]
                if PRIVATE_ATTRIBUTE.search(code) or PRIVATE_IMPORT.search(code):
                    offenders.append(f"{file.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == [], "\n".join(offenders)


def test_library_modules_reach_no_other_modules_privates():
    offenders = []
    for file in sorted((ROOT / "engine").glob("**/*.py")):
        for n, line in enumerate(file.read_text().splitlines(), 1):
            if re.search(r"from \.+[\w.]* import .*\b_[a-z]\w*", line):
                offenders.append(f"{file.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == [], "\n".join(offenders)
