"""Builds lknets' CUDA extension ``kernels._C`` (``python setup.py build_ext --inplace``).

Targets sm_80 and sm_90 unless TORCH_CUDA_ARCH_LIST says otherwise. Without a CUDA toolkit (or
with a CPU-only torch) it builds nothing and says why: the models then use torch's convolution,
and ``kernels`` can still JIT-build itself later on a machine that has a toolkit.
"""
import os
import sys

from setuptools import find_packages, setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels import _build  # noqa: E402  (imports torch only; compiles nothing)

ext_modules, cmdclass = [], {}
cuda_home = _build.find_cuda_home()
if cuda_home is None:
    print(_build.no_toolkit_message(), file=sys.stderr)
else:
    _build.use_toolkit(cuda_home)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _build.DEFAULT_ARCH_LIST)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    here = os.path.dirname(os.path.abspath(__file__))
    ext_modules = [CUDAExtension("kernels._C",
                                 [os.path.relpath(s, here) for s in _build.SOURCES],
                                 extra_compile_args=_build.compile_flags())]
    cmdclass = {"build_ext": BuildExtension}

setup(
    name="lknets",
    version="0.1.0",
    description="Large-kernel ConvNets (RepLKNet, SLaK, UniRepLKNet, ConvNeXt) with fast depthwise kernels",
    packages=find_packages(include=["models", "models.*", "kernels", "kernels.*",
                                    "modalities"]),
    package_data={"kernels": ["csrc/*.cpp", "csrc/*.cu", "csrc/*.cuh", "csrc/*.h"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
)
