"""Packaging: a wheel builds against the installed torch, installs into a
fresh virtual environment and works there (outside the source tree), and
reports the version the package says it has."""
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

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

    # A fresh venv that sees the installed torch (no download), the wheel in
    # it; without PYTHONPATH, which could point it at a source tree instead.
    # This interpreter's site-packages (torch's) go on the venv's path behind
    # its own through a .pth file: --system-site-packages alone gives the
    # base interpreter's, which lack torch when this one is itself a venv's
    # (the GPU machine's: session 8). A .pth line adds a directory without
    # running the .pth files in it, so an editable nanoblock there stays out.
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--system-site-packages", str(venv), cwd=tmp_path)
    python = str(venv / "bin" / "python")
    venv_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    venv_site = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                    cwd=tmp_path, env=venv_env).strip()
    outer = [p for p in site.getsitepackages() if os.path.isdir(p)]
    (Path(venv_site) / "outer_site_packages.pth").write_text("\n".join(outer) + "\n")
    run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel), cwd=tmp_path,
        env=venv_env)
    out = run(python, "-c", (
        "import torch, nanoblock, nanoblock.info;"
        f"assert nanoblock.__file__.startswith({str(venv)!r}), nanoblock.__file__;"
        "b = nanoblock.Block(nanoblock.GPTConfig(n_embd=32, n_head=2));"
        "x = torch.randn(2, 5, 32, requires_grad=True); b(x).sum().backward();"
        "assert torch.isfinite(x.grad).all();"
        "print(nanoblock.__version__)"), cwd=tmp_path, env=venv_env)
    assert out.strip() == nanoblock.__version__
    # the bug-report command works from the installed package
    assert "nanoblock" in run(python, "-m", "nanoblock.info", cwd=tmp_path, env=venv_env)


def run_setup(tmp_path, prelude, env=None):
    """setup.py --version in a subprocess after `prelude` (Python that breaks
    the environment on purpose); returns (exit code, output). It runs from a
    copy in tmp_path, so what it writes (nanoblock/_build_info.py) stays there."""
    shutil.copy(os.path.join(ROOT, "setup.py"), tmp_path / "setup.py")
    shutil.copytree(os.path.join(ROOT, "nanoblock"), tmp_path / "nanoblock",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    code = (f"import runpy, sys\n{prelude}\n"
            "sys.argv = ['setup.py', '--version']\n"
            "runpy.run_path('setup.py', run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, env=dict(os.environ, **(env or {})))
    return result.returncode, result.stdout + result.stderr


def test_build_without_torch_says_what_to_do(tmp_path):
    code, out = run_setup(tmp_path, "sys.modules['torch'] = None  # import torch fails")
    assert code != 0
    assert "needs PyTorch installed first" in out and "--no-build-isolation" in out, out


def fake_cuda_toolkit(tmp_path, release):
    """CUDA_HOME with only an nvcc that reports `release` (no cuBLAS)."""
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(0o755)
    return str(tmp_path / "cuda")


def cuda_torch(version):
    """Python that makes torch say it was built with CUDA `version` (no GPU)."""
    return (f"import torch; torch.version.cuda = '{version}'; "
            "torch.cuda._is_compiled = lambda: True; torch.cuda.is_available = lambda: False")


def test_build_with_mismatched_nvcc_says_what_to_do(tmp_path):
    # A CUDA 99 nvcc next to a torch that says it was built with CUDA 12.
    code, out = run_setup(tmp_path, cuda_torch("12.8"),
                          env={"CUDA_HOME": fake_cuda_toolkit(tmp_path, "99.1"),
                               "NANOBLOCK_CPU_ONLY": "0"})
    assert code != 0
    assert "nvcc is CUDA 99.1 but torch was built with CUDA 12.8" in out, out
    assert "NANOBLOCK_CPU_ONLY=1" in out, out


def test_cuda_build_finds_pip_cublaslt(tmp_path):
    # pip's nvidia-cublas layout for CUDA 13, with only the versioned library
    pip = tmp_path / "site" / "nvidia" / "cu13"
    (pip / "include").mkdir(parents=True)
    (pip / "include" / "cublasLt.h").write_text("")
    (pip / "lib").mkdir()
    (pip / "lib" / "libcublasLt.so.13").write_text("")
    code, out = run_setup(tmp_path, cuda_torch("13.0"),
                          env={"CUDA_HOME": fake_cuda_toolkit(tmp_path, "13.0"),
                               "NANOBLOCK_CPU_ONLY": "0",
                               "PYTHONPATH": str(tmp_path / "site")})
    assert code == 0, out
    assert f"nanoblock: cuBLASLt from {pip / 'lib' / 'libcublasLt.so.13'}" in out, out


def test_cuda_build_without_cublaslt_says_what_to_install(tmp_path):
    # no nvidia namespace package to find it in, and a toolkit without it
    code, out = run_setup(tmp_path, "sys.modules['nvidia'] = None\n" + cuda_torch("13.0"),
                          env={"CUDA_HOME": fake_cuda_toolkit(tmp_path, "13.0"),
                               "NANOBLOCK_CPU_ONLY": "0"})
    assert code != 0
    assert "needs cuBLASLt" in out and "pip install nvidia-cublas" in out, out
