"""Build script for the optional Cython extension imd._fastpath (metadata is in pyproject.toml).

The extension is optional: when Cython is missing, no C compiler works, or the
build fails for any other reason, a warning is printed and the package installs
without it; imd.fastpath then uses the pure-Python twin (imd/_fastpath_py.py).
"""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _warn(what, err):
    sys.stderr.write(f"WARNING: imd._fastpath not built ({what}: {err}); "
                     "imd will use the pure-Python fast path.\n")


class OptionalBuildExt(build_ext):
    """build_ext that never fails the install."""

    def run(self):
        try:
            super().run()
        except Exception as err:          # no compiler, bad toolchain, ...
            _warn("build_ext", err)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as err:
            _warn(ext.name, err)


def _extensions():
    try:
        from Cython.Build import cythonize
    except ImportError as err:
        _warn("Cython missing", err)
        return []
    try:
        return cythonize([Extension("imd._fastpath", ["imd/_fastpath.pyx"])],
                         compiler_directives={"language_level": 3}, quiet=True)
    except Exception as err:
        _warn("cythonize", err)
        return []


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
