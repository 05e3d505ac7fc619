"""Builds the native libraries of aql_kernels with CMake during `pip install` / `build_ext`.

libaql_cpu.so is always built (C++17, OpenMP, -O3), portable: its kernels are compiled for baseline
x86-64, x86-64-v3 (AVX2) and x86-64-v4 (AVX-512) and picked at run time from the CPU's features.
AQL_NATIVE_ARCH=native (or 1 / ON) builds them for this machine only (-march=native), which fails on
older CPUs. libaql_cuda.so is built when nvcc is found (static CUDA runtime; AQL_CUDA_ARCHS, default
"80;90", PTX for the newest). Both land inside aql_kernels/. AQL_SKIP_NATIVE=1 skips the native
build; AQL_REQUIRE_CUDA=1 makes a missing nvcc or a failed CUDA build an error;
AQL_ONLY_TORCH_EXTENSION=1 builds aql_kernels._C alone (the libraries built by CMake directly).

Then aql_kernels._C, the C++ eager route of the score ops for small CPU calls
(aql_kernels/csrc/torch/), is compiled against the torch of the building interpreter with
torch.utils.cpp_extension. It is optional: when torch is missing (an isolated pip build) or the
compilation fails, the build warns and goes on, and the ops take their Python route
(`aql_kernels.backends()["cpu_extension"]` says why). AQL_SKIP_TORCH_EXTENSION=1 skips it.
"""

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from setuptools import Distribution, Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc() -> str | None:
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return None


def find_cmake() -> str:
    cmake = shutil.which("cmake")
    if cmake:
        return cmake
    try:
        import cmake as cmake_package  # the PyPI wheel

        return str(Path(cmake_package.CMAKE_BIN_DIR) / "cmake")
    except ImportError:
        raise RuntimeError("aql: CMake is needed to build the native libraries: `pip install cmake` or apt-get install cmake") from None


def native_arch() -> bool:
    value = os.environ.get("AQL_NATIVE_ARCH", "").strip().lower()
    if value in ("", "0", "off", "no", "false", "portable"):
        return False
    if value in ("1", "on", "yes", "true", "native"):
        return True
    raise RuntimeError(f"aql: AQL_NATIVE_ARCH must be native (or 1 / ON) or unset, got {os.environ['AQL_NATIVE_ARCH']!r}")


def build_native(output_dir: Path, build_dir: Path) -> None:
    cmake = find_cmake()
    nvcc = find_nvcc()
    require_cuda = os.environ.get("AQL_REQUIRE_CUDA") == "1"
    if nvcc is None and require_cuda:
        raise RuntimeError("aql: AQL_REQUIRE_CUDA=1 but nvcc was not found (PATH, CUDA_HOME, /usr/local/cuda)")
    args = [
        cmake, "-S", str(ROOT), "-B", str(build_dir),
        "-DCMAKE_BUILD_TYPE=Release",
        f"-DAQL_OUTPUT_DIR={output_dir}",
        f"-DAQL_BUILD_CUDA={'ON' if nvcc else 'OFF'}",
    ]
    if nvcc:
        args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
    # Always passed, so that a build directory configured earlier does not keep a cached value.
    args.append(f"-DAQL_NATIVE_ARCH={'ON' if native_arch() else 'OFF'}")
    if os.environ.get("AQL_CUDA_ARCHS"):
        args.append(f"-DAQL_CUDA_ARCHS={os.environ['AQL_CUDA_ARCHS']}")
    if shutil.which("ninja") and not (build_dir / "CMakeCache.txt").exists():
        args += ["-G", "Ninja"]
    subprocess.run(args, check=True)
    jobs = str(os.cpu_count() or 2)
    subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)


TORCH_EXTENSION_SOURCES = ["aql_kernels/csrc/torch/extension.cpp"]


def build_torch_extension(command: build_ext, output_dir: Path) -> None:
    """Compiles aql_kernels._C into output_dir; warns instead of failing (the extension is optional)."""
    if os.environ.get("AQL_SKIP_TORCH_EXTENSION") == "1":
        print("aql: AQL_SKIP_TORCH_EXTENSION=1, not building aql_kernels._C", file=sys.stderr)
        return
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as error:  # no torch in this (isolated) build environment
        warnings.warn(f"aql: aql_kernels._C not built (torch does not import here: {error}); the score ops take "
                      "their Python route. Build it with `make native` in an environment that has torch.", stacklevel=1)
        return
    extension = CppExtension("aql_kernels._C", TORCH_EXTENSION_SOURCES, include_dirs=[str(ROOT / "aql_kernels" / "csrc")],
                             extra_compile_args=["-O2", "-g0", "-Wall"])
    # its own distribution: the outer one's extensions are the placeholder that CMakeBuild stands for
    builder = BuildExtension(Distribution({"name": "aql", "ext_modules": [extension]}), use_ninja=shutil.which("ninja") is not None)
    builder.inplace = 0
    builder.build_lib = str(output_dir.parent)
    builder.build_temp = str(Path(command.build_temp).resolve() / "torch_extension")
    try:
        builder.ensure_finalized()
        builder.run()
    except Exception as error:  # a compiler error, or a torch without its headers
        warnings.warn(f"aql: building aql_kernels._C failed ({type(error).__name__}: {error}); the score ops take "
                      "their Python route.", stacklevel=1)


class CMakeBuild(build_ext):
    """Runs CMake instead of compiling the (placeholder) extension, then builds aql_kernels._C."""

    def run(self):
        if os.environ.get("AQL_SKIP_NATIVE") == "1":
            print("aql: AQL_SKIP_NATIVE=1, not building the native libraries", file=sys.stderr)
            return
        if self.inplace or getattr(self, "editable_mode", False):
            output_dir = ROOT / "aql_kernels"  # editable install / build_ext --inplace
        else:
            output_dir = Path(self.build_lib).resolve() / "aql_kernels"
        output_dir.mkdir(parents=True, exist_ok=True)
        if os.environ.get("AQL_ONLY_TORCH_EXTENSION") == "1":  # the libraries built elsewhere (gpu_check.sh)
            print("aql: AQL_ONLY_TORCH_EXTENSION=1, building aql_kernels._C only", file=sys.stderr)
        else:
            build_native(output_dir, Path(self.build_temp).resolve() / "cmake")
        build_torch_extension(self, output_dir)

    # The libraries are written where they belong; there is no per-extension file to copy or list.
    def copy_extensions_to_source(self):
        pass

    def get_outputs(self):
        return []

    def get_output_mapping(self):
        return {}


# One placeholder extension makes setuptools run build_ext; CMake produces the real libraries.
setup(ext_modules=[Extension("aql_kernels._native_libraries", sources=[])], cmdclass={"build_ext": CMakeBuild})
