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


def _modules(folder: str = "engine"):
    return sorted((ROOT / folder).glob("**/*.py"))


def test_only_the_store_names_a_memorys_files():
    """The files of a memory's directory (manifest, snapshots, log segments) are named in
    engine/store/ alone; everyone else asks the store."""
    names = re.compile(r"manifest\.json|\bMANIFEST\b|snapshot-\d|wal-\d|\.arrows\b|\bSNAPSHOT_NAME\b|\bSEGMENT_NAME\b")
    offenders = [f"{f.relative_to(ROOT)}:{n}: {line.strip()}" for f in _modules()
                 if "store" not in f.relative_to(ROOT / "engine").parts[:1]
                 for n, line in enumerate(f.read_text().splitlines(), 1) if names.search(line.split("#")[0])]
    assert offenders == [], "\n".join(offenders)


def test_options_are_listed_in_options_py_alone():
    """A list of option names (what once drifted apart in five places) is written only in
    engine/options.py; the manifest keys of a shard's role only there too."""
    import ast
    import dataclasses

    from engine.options import MemoryOptions

    options = {f.name for f in dataclasses.fields(MemoryOptions)}
    offenders = []
    for file in _modules():
        if file.name == "options.py":
            continue
        text = file.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                named = [e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in options]
                if len(named) >= 3:
                    offenders.append(f"{file.relative_to(ROOT)}:{node.lineno}: lists options {named}")
        for key in ("id_stride", "id_offset"):
            if key in text:
                offenders.append(f"{file.relative_to(ROOT)}: names the manifest key {key}")
    assert offenders == [], "\n".join(offenders)


def test_import_engine_loads_neither_flight_ray_nor_torch():
    import subprocess
    import sys

    code = "import engine, sys; print(sorted({'pyarrow.flight', 'ray', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# raised outside engine.errors on purpose: an OS error fsio makes for a short write (turned
# into a StorageError by its caller), the command line's own exit, Python's attribute protocol,
# the Flight statuses the server answers with (the client turns them back into engine errors),
# and the test kit's abstract methods and failed checks
ALLOWED_RAISES = {("store/fsio.py", "OSError"), ("cli.py", "Exit"), ("__init__.py", "AttributeError"),
                  ("slots.py", "AttributeError"), ("serve/client.py", "FlightServerError"),
                  ("serve/server.py", "FlightServerError"), ("serve/server.py", "FlightUnauthenticatedError"),
                  ("testing.py", "NotImplementedError"), ("testing.py", "AssertionError")}


def test_every_raise_is_an_engine_error():
    """What the library raises on purpose is an engine.errors type (each subclasses the
    built-in a caller would expect); a bare ``raise`` or a caught exception raised again is fine."""
    import ast

    import engine.errors

    ours = {name for name, value in vars(engine.errors).items() if isinstance(value, type)}
    offenders = []
    for file in _modules():
        rel = str(file.relative_to(ROOT / "engine"))
        for node in ast.walk(ast.parse(file.read_text())):
            if not isinstance(node, ast.Raise) or not isinstance(node.exc, ast.Call):
                continue
            func = node.exc.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
            if name is None or name in ours or (rel, name) in ALLOWED_RAISES:
                continue
            if name[0].islower() or name.startswith("_"):  # a helper that builds an engine error, or a
                continue  # private subclass of one (fsio.storage_error, client's _Unavailable, ...)
            offenders.append(f"engine/{rel}:{node.lineno}: raise {name}(...)")
    assert offenders == [], "\n".join(offenders)
