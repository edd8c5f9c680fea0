"""The core install: the built wheel alone in a fresh venv (no optional extra) runs the
README's install example; what it took is printed, not asserted."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20


@pytest.mark.slow
def test_the_core_wheel_installs_alone_and_runs_the_readme_example(tmp_path):
    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels),
                            str(ROOT)], capture_output=True, text=True)  # its build tools in an env of its own
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next(wheels.glob("engine-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    t0 = time.perf_counter()
    done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(wheel)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    print(f"core install: {time.perf_counter() - t0:.1f} s, venv {_size_mb(venv):.0f} MB")
    for module in ("torch", "PIL", "matplotlib", "ray", "numba"):  # no extra came with the core
        probe = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True)
        assert probe.returncode != 0, f"{module} was installed with the core"
    readme = (ROOT / "README.md").read_text()
    install = readme[readme.index("## Install"):]
    example = re.search(r"```python\n(.*?)```", install, re.S).group(1)
    run = subprocess.run([str(python), "-c", example], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "2000"
    cli = subprocess.run([str(venv / "bin" / "engine"), "memory", "info", "my-memory"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert cli.returncode == 0 and "2,000" in cli.stdout + cli.stderr, cli.stdout + cli.stderr
    train = subprocess.run([str(venv / "bin" / "engine"), "train", "--out", str(tmp_path / "run")], cwd=tmp_path,
                           capture_output=True, text=True)
    assert train.returncode == 2 and "'nn' extra" in train.stderr, train.stdout + train.stderr
