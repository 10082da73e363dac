"""Builds nanoblock's compiled ops, nanoblock._C, against the installed torch.

Install with `pip install --no-build-isolation -e .` so the extension compiles
against the torch you already have. The CUDA extension is built when that
torch has CUDA and nvcc is found, the CPU one otherwise; the build says which.
The CUDA extension calls cuBLASLt (csrc/cuda/gemm.cu): from the CUDA toolkit
if it has it, else from pip's nvidia-cublas (which CUDA builds of torch
install beside themselves).

Environment:
  NANOBLOCK_CPU_ONLY=1       build the CPU extension even where CUDA is there
  TORCH_CUDA_ARCH_LIST       GPU archs to build for (default "8.0;9.0"; 9.0 is
                             built as 9.0a, which Hopper's wgmma needs)
  MAX_JOBS                   parallel compile jobs (ninja)
"""
import glob
import importlib.util
import os
import re
import subprocess
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit(
        "nanoblock: building needs PyTorch installed first, and pip must see it.\n"
        "  1. pip install torch            (here: pip install torch==2.13.0)\n"
        "  2. pip install --no-build-isolation -e .\n"
        "Without --no-build-isolation pip builds in a fresh environment that has no torch."
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(HERE, "nanoblock", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def nvcc_version():
    if CUDA_HOME is None:
        return None
    try:
        out = subprocess.run([os.path.join(CUDA_HOME, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def want_cuda():
    if os.environ.get("NANOBLOCK_CPU_ONLY") == "1":
        return False, "NANOBLOCK_CPU_ONLY=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} has no CUDA"
    nvcc = nvcc_version()
    if nvcc is None:
        return False, f"torch has CUDA {torch.version.cuda} but nvcc was not found (set CUDA_HOME)"
    if nvcc.split(".")[0] != torch.version.cuda.split(".")[0]:
        sys.exit(f"nanoblock: nvcc is CUDA {nvcc} but torch was built with CUDA "
                 f"{torch.version.cuda}; their major versions must match. Point CUDA_HOME at a "
                 f"CUDA {torch.version.cuda.split('.')[0]}.x toolkit, or set NANOBLOCK_CPU_ONLY=1.")
    return True, f"torch {torch.__version__} with CUDA {torch.version.cuda}, nvcc {nvcc}"


def cublaslt_in(include_dir, lib_dir):
    """(include_dir, library file) where cuBLASLt's header and library are
    in these folders, else None. pip's nvidia-cublas ships only the versioned
    library (libcublasLt.so.13), which -lcublasLt does not find, so the
    extension links the file itself: the unversioned name where there is
    one, else the one with the major version (sorted first either way)."""
    libraries = sorted(glob.glob(os.path.join(lib_dir, "libcublasLt.so*")))
    if os.path.isfile(os.path.join(include_dir, "cublasLt.h")) and libraries:
        return include_dir, libraries[0]
    return None


def find_cublaslt():
    """cuBLASLt for the CUDA extension, as cublaslt_in returns it: the CUDA
    toolkit's (CUDA_HOME), else pip's nvidia-cublas, found through Python's
    import system (nvidia/cu13/{include,lib} for CUDA 13, nvidia/cublas/...
    for CUDA 12). Exits saying what to install when there is neither."""
    major = int(torch.version.cuda.split(".")[0])
    places = [(os.path.join(CUDA_HOME, "include"), os.path.join(CUDA_HOME, lib))
              for lib in ("lib64", "lib")]
    for package in (f"nvidia.cu{major}", "nvidia.cublas"):
        try:
            spec = importlib.util.find_spec(package)
        except ImportError:  # no nvidia namespace package at all
            spec = None
        if spec is not None and spec.submodule_search_locations:
            places += [(os.path.join(root, "include"), os.path.join(root, "lib"))
                       for root in spec.submodule_search_locations]
    for include_dir, lib_dir in places:
        found = cublaslt_in(include_dir, lib_dir)
        if found:
            return found
    wheel = "nvidia-cublas" if major >= 13 else f"nvidia-cublas-cu{major}"
    sys.exit(f"nanoblock: the CUDA extension needs cuBLASLt (csrc/cuda/gemm.cu calls it), which is "
             f"neither in the CUDA toolkit at {CUDA_HOME} nor installed by pip. Install it for "
             f"CUDA {major}: pip install {wheel}   (or set NANOBLOCK_CPU_ONLY=1 for the CPU build)")


def hopper_as_sm90a(arch_list):
    """TORCH_CUDA_ARCH_LIST with 9.0 (or Hopper) spelt 9.0a, +PTX kept."""
    archs = arch_list.replace(" ", ";").replace("Hopper", "9.0+PTX").split(";")
    return ";".join("9.0a" + a[3:] if a == "9.0" or a.startswith("9.0+") else a
                    for a in archs if a)


def extension():
    sources = ["csrc/ops.cpp", "csrc/autograd.cpp", "csrc/block.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -g0: no debug info, which triples the build time of the ATen headers.
    # -fno-trapping-math: lets the compiler turn float selects into vector
    # blends (nanoblock reads no floating-point exception flags).
    cxx = ["-O3", "-fopenmp", "-g0", "-fno-trapping-math"]
    # NANOBLOCK_EXTRA_FLAGS: more flags for the C++ compiles and the link, e.g.
    # the sanitizers of scripts/sanitize_cpu.sh (given here they reach every
    # compile and the link, whatever build path torch takes).
    extra = os.environ.get("NANOBLOCK_EXTRA_FLAGS", "").split()
    cxx += extra
    link = ["-fopenmp"] + extra
    use_cuda, why = want_cuda()
    if not use_cuda:
        print(f"nanoblock: building the CPU extension ({why})", flush=True)
        return CppExtension("nanoblock._C", sources, extra_compile_args={"cxx": cxx},
                            extra_link_args=link), "cpu", why
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    # Hopper's wgmma (csrc/cuda/attention_wgmma*.cu) exists only in the
    # architecture-specific target sm_90a, so 9.0 is built as 9.0a (that code
    # runs on compute capability 9.0 only, which is what 9.0 names). The
    # device pass of any other arch compiles the wgmma kernels empty
    # (NANOBLOCK_WGMMA_DEVICE, wgmma.cuh); NANOBLOCK_SM90A tells the host code
    # that the build holds them.
    os.environ["TORCH_CUDA_ARCH_LIST"] = hopper_as_sm90a(os.environ["TORCH_CUDA_ARCH_LIST"])
    print(f"nanoblock: building the CUDA extension ({why}) for archs "
          f"{os.environ['TORCH_CUDA_ARCH_LIST']}", flush=True)
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr",
            "-DNANOBLOCK_WITH_CUDA"]
    if "9.0a" in os.environ["TORCH_CUDA_ARCH_LIST"]:
        nvcc.append("-DNANOBLOCK_SM90A")  # the build holds the wgmma kernels
    # cuBLASLt: its headers' folder (where pip's holds the other CUDA
    # libraries' headers too), the library file itself and its folder as an
    # rpath (torch has usually loaded that library already by then).
    cublaslt_include, cublaslt = find_cublaslt()
    print(f"nanoblock: cuBLASLt from {cublaslt}", flush=True)
    link += [cublaslt, f"-Wl,-rpath,{os.path.dirname(cublaslt)}"]
    return CUDAExtension("nanoblock._C", sources, include_dirs=[cublaslt_include],
                         extra_compile_args={"cxx": cxx + ["-DNANOBLOCK_WITH_CUDA"], "nvcc": nvcc},
                         extra_link_args=link), "cuda", why


ext, backend, why = extension()

# What was built, for `python -m nanoblock.info` and bug reports.
with open(os.path.join(HERE, "nanoblock", "_build_info.py"), "w") as f:
    f.write("# Written by setup.py at build time.\n")
    f.write(f"backend = {backend!r}\n")
    f.write(f"reason = {why!r}\n")
    f.write(f"torch_version = {torch.__version__!r}\n")
    f.write(f"torch_cuda_version = {torch.version.cuda!r}\n")
    f.write(f"nvcc_version = {nvcc_version() if backend == 'cuda' else None!r}\n")
    f.write(f"cuda_arch_list = {os.environ.get('TORCH_CUDA_ARCH_LIST') if backend == 'cuda' else None!r}\n")

setup(
    version=read_version(),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension},
)
