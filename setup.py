"""Builds the one compiled extension, pyswtask._core; the C file is generated at build time."""
import shutil
import sys

from setuptools import Extension, setup

if not sys.platform.startswith("linux"):
    sys.exit("pyswtask runs on Linux only: its core is built on epoll and SysV IPC.")

try:
    from Cython.Build import cythonize
except ImportError:  # pip's build isolation installs Cython from pyproject.toml
    sys.exit("building pyswtask needs Cython>=3: pip install Cython, or build through pip")


def _check_compiler() -> None:
    """Fails early, and in words, when there is no C compiler: setuptools' own error comes
    after Cython's output and names only a missing file."""
    from setuptools._distutils.ccompiler import new_compiler
    from setuptools._distutils.sysconfig import customize_compiler

    cc = new_compiler()
    customize_compiler(cc)
    compiler = (getattr(cc, "compiler_so", None) or ["cc"])[0]
    if shutil.which(compiler) is None:
        sys.exit(f"building pyswtask needs a C compiler, and {compiler!r} was not found: install "
                 "one (Debian/Ubuntu: apt-get install gcc python3-dev), or install a pyswtask "
                 "wheel instead of building from source")


if any(cmd in sys.argv for cmd in ("build_ext", "build", "bdist_wheel", "install", "develop",
                                   "editable_wheel")):
    _check_compiler()

extensions = cythonize(
    [Extension("pyswtask._core", ["pyswtask/_core.pyx"], extra_compile_args=["-O2"])],
    compiler_directives={"language_level": 3, "embedsignature": True},
)

setup(ext_modules=extensions)
