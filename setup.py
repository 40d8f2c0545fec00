"""Builds the one compiled extension, pyswtask._core; the C file is generated at build time."""
import sys

from setuptools import Extension, setup

if not sys.platform.startswith("linux"):
    sys.exit("pyswtask runs on Linux only: its core is built on epoll and SysV IPC.")

try:
    from Cython.Build import cythonize
except ImportError:  # pip's build isolation installs Cython from pyproject.toml
    sys.exit("building pyswtask needs Cython>=3: pip install Cython, or build through pip")

extensions = cythonize(
    [Extension("pyswtask._core", ["pyswtask/_core.pyx"], extra_compile_args=["-O2"])],
    compiler_directives={"language_level": 3, "embedsignature": True},
)

setup(ext_modules=extensions)
