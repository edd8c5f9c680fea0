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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_prepared_process_reuses_large_blocks_rather_than_faulting_them_in_again():
    """64 MB written and freed 20 times (a 40x40 batch's activations are 52 MB): 16k pages
    each time unprepared, about once prepared. Fault counts, not timings."""
    code = ("import ctypes, json, resource, sys; from engine.runtime import prepare\n"  # libc's malloc, as torch's
            "if sys.argv[1] == 'yes': prepare()\n"
            "libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p; libc.free.argtypes = [ctypes.c_void_p]\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for _ in range(20):\n    p = libc.malloc(64 << 20); ctypes.memset(p, 1, 64 << 20); libc.free(p)\n"
            "print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))")
    pages = (64 << 20) // 4096  # 4 KB pages of one block
    faults = {}
    for prepared in ("no", "yes"):
        out = subprocess.run([sys.executable, "-c", code, prepared], capture_output=True, text=True, timeout=120,
                             check=True)
        faults[prepared] = json.loads(out.stdout.strip().splitlines()[-1])
    # a ratio, not page counts: with transparent huge pages a fault brings 2 MB in
    assert faults["no"] > 10 * faults["yes"] and faults["yes"] < 3 * pages, faults


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
