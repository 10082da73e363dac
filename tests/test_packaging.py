"""Packaging: a wheel builds against the installed torch, installs into a
fresh virtual environment and works there (outside the source tree), and
reports the version the package says it has."""
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

import nanoblock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*cmd, cwd, env=None):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.mark.skipif(sys.platform != "linux", reason="checked on Linux")
def test_wheel_builds_installs_and_runs(tmp_path):
    # The build runs in a copy, so the source tree's own build is left alone.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.so", "*.egg-info", "__pycache__", ".hypothesis", "benchmarks"))
    env = dict(os.environ, NANOBLOCK_CPU_ONLY="1", MAX_JOBS="2")
    run(sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", ".",
        "-w", str(tmp_path / "dist"), cwd=src, env=env)
    (wheel,) = (tmp_path / "dist").glob("nanoblock-*.whl")
    assert wheel.name.startswith(f"nanoblock-{nanoblock.__version__}-")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("nanoblock/_C") and n.endswith(".so") for n in names), names

    # A fresh venv that sees the installed torch (no download), the wheel in it.
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--system-site-packages", str(venv), cwd=tmp_path)
    python = str(venv / "bin" / "python")
    run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel), cwd=tmp_path)
    out = run(python, "-c", (
        "import torch, nanoblock, nanoblock.info;"
        f"assert nanoblock.__file__.startswith({str(venv)!r}), nanoblock.__file__;"
        "b = nanoblock.Block(nanoblock.GPTConfig(n_embd=32, n_head=2));"
        "x = torch.randn(2, 5, 32, requires_grad=True); b(x).sum().backward();"
        "assert torch.isfinite(x.grad).all();"
        "print(nanoblock.__version__)"), cwd=tmp_path)
    assert out.strip() == nanoblock.__version__
    # the bug-report command works from the installed package
    assert "nanoblock" in run(python, "-m", "nanoblock.info", cwd=tmp_path)
