"""The README's Python examples run as written, in order, in one namespace (as a reader
pasting them into one session would), in an empty directory.

Two examples talk to a service the README starts from the shell just above them: the
Client example to ``engine serve --memory my-memory --port 8815``, here a server on a
free port (the address is the one thing changed); the scale-out example to a Ray
cluster, run by tests/cluster/test_cluster.py on its local one, with its shared path and shard
count made local.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_readme_has_examples_for_each_door():
    code = "\n".join(blocks())
    for door in ("Memory(", "Memory.open(", "Client(", "ShardedMemory(", "MatchingNetwork("):
        assert door in code, door


def test_every_readme_example_runs_as_written(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    server = None
    try:
        for code in blocks():
            if "ShardedMemory(" in code:
                continue  # below, with Ray
            if "Client(" in code:
                from engine import Memory
                from engine.serve import MemoryServer

                served = Memory.open("my-memory")
                server = MemoryServer({"my-memory": served}, "grpc://127.0.0.1:0", token="...")
                code = code.replace("127.0.0.1:8815", f"127.0.0.1:{server.port}")
            exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own examples
    finally:
        client = namespace.get("mem")
        if client is not None and hasattr(client, "close"):
            client.close()  # the last example's Client
        if server is not None:
            server.shutdown()
            served.close()
    assert (tmp_path / "pets").is_dir() and namespace["result"].probs.shape[0] == 4  # the last examples ran
    from engine import Memory

    with Memory.open(tmp_path / "pets") as pets:  # every durable memory the examples made was released
        assert len(pets) > 0
