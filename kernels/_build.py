"""Finding a CUDA toolkit and building ``kernels._C``; shared by setup.py and the JIT path.

Two facts of common installs shape this. ``nvcc`` on PATH is often a wrapper script, so torch's own
guess of CUDA_HOME (the parent of ``which nvcc``) is wrong: we look for a directory that holds both
``bin/nvcc`` and ``include/cuda_runtime.h``. And a toolkit assembled from pip wheels may lack the
library headers (cuBLAS, cuSPARSE) that ATen includes; torch's own ``nvidia/cu<major>/include``
supplies them, added with ``-isystem`` so that it is searched after the toolkit's runtime headers.
"""
from __future__ import annotations

import glob
import os
import shutil
from typing import List, Optional

import torch

EXTENSION_NAME = "lknets_kernels"
CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
SOURCES = [os.path.join(CSRC, "ops.cpp"), os.path.join(CSRC, "dwconv_kernels.cu"),
           os.path.join(CSRC, "dwconv_gemm.cu"), os.path.join(CSRC, "dwconv_rows.cu"),
           os.path.join(CSRC, "dwconv_small.cu"), os.path.join(CSRC, "dwconv_mid.cu"),
           os.path.join(CSRC, "oriented.cu"), os.path.join(CSRC, "oriented_plane.cu")]
DEFAULT_ARCH_LIST = "8.0;9.0"


def _is_toolkit(path: Optional[str]) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def find_cuda_home() -> Optional[str]:
    """The CUDA toolkit directory to build with, or None when there is none (or torch is CPU-only)."""
    if torch.version.cuda is None:
        return None
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    major = torch.version.cuda.split(".")[0]
    candidates += ["/usr/local/cuda"] + sorted(glob.glob(f"/usr/local/cuda-{major}*"), reverse=True)
    for path in candidates:
        if _is_toolkit(path):
            return os.path.realpath(path)
    return None


def extra_include_flags() -> List[str]:
    """``-isystem`` flags for the CUDA library headers shipped with torch's pip dependencies."""
    if torch.version.cuda is None:
        return []
    major = torch.version.cuda.split(".")[0]
    site = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    flags = []
    for include in (os.path.join(site, "nvidia", f"cu{major}", "include"),
                    os.path.join(site, "nvidia", "cublas", "include"),
                    os.path.join(site, "nvidia", "cusparse", "include")):
        if os.path.isdir(include):
            flags += ["-isystem", include]
    return flags


def compile_flags() -> dict:
    includes = extra_include_flags()
    return {"cxx": ["-O3"] + includes,
            "nvcc": ["-O3", "-Xptxas=-O3"] + includes}


def no_toolkit_message() -> str:
    if torch.version.cuda is None:
        return ("lknets kernels: this torch build has no CUDA support, so the CUDA extension cannot "
                "be built; the large-kernel convs use torch's own implementation.")
    return ("lknets kernels: no CUDA toolkit found (looked at $CUDA_HOME, $CUDA_PATH, the nvcc on "
            "PATH and /usr/local/cuda*); set CUDA_HOME to a toolkit with bin/nvcc and "
            f"include/cuda_runtime.h (CUDA {torch.version.cuda.split('.')[0]}.x, matching torch) to "
            "build it. The large-kernel convs use torch's own implementation meanwhile.")


def use_toolkit(cuda_home: str) -> None:
    """Point torch.utils.cpp_extension at ``cuda_home`` (it reads CUDA_HOME once, at import)."""
    os.environ["CUDA_HOME"] = cuda_home
    import torch.utils.cpp_extension as cpp_extension
    cpp_extension.CUDA_HOME = cuda_home


def jit_build() -> None:
    """Compile (or reuse the cached build of) the extension and load its operators into torch.ops."""
    cuda_home = find_cuda_home()
    if cuda_home is None:
        raise RuntimeError(no_toolkit_message())
    use_toolkit(cuda_home)
    from torch.utils.cpp_extension import load
    flags = compile_flags()
    load(name=EXTENSION_NAME, sources=SOURCES, extra_cflags=flags["cxx"],
         extra_cuda_cflags=flags["nvcc"], is_python_module=False, verbose=False)
