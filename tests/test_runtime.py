"""engine.runtime: the process setup of torch work. Its effect on speed is measured by
bench/torch_runtime.py; here, that it takes, refuses bad input, and stays out of import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engine import runtime
from engine.errors import InvalidValueError


def _fresh(code: str, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_prepare_tunes_the_allocator_and_sets_threads_in_a_fresh_process():
    got = _fresh("import json, torch; from engine.runtime import prepare; a = prepare(threads=1); b = prepare(); "
                 "print(json.dumps([a, b, torch.get_num_threads()]))", env={"OMP_WAIT_POLICY": "PASSIVE"})
    first, again, threads = got
    assert first == {"malloc": True, "omp_wait_policy": "PASSIVE", "threads": 1} and threads == 1
    assert again == {"malloc": True, "omp_wait_policy": "PASSIVE"}  # a second call is harmless


def test_prepare_refuses_bad_threads():
    for bad in (0, -2, 1.5, "2", True):
        with pytest.raises(InvalidValueError, match="threads"):
            runtime.prepare(threads=bad)


def test_no_glibc_means_nothing_to_tune(monkeypatch):
    monkeypatch.setattr(runtime.sys, "platform", "darwin")
    assert runtime.prepare()["malloc"] is False


def test_importing_engine_changes_no_process_setting():
    got = _fresh("import json, os, engine, engine.runtime; print(json.dumps(os.environ.get('OMP_WAIT_POLICY')))",
                 env={})
    assert got is None
