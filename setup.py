"""Build script for the optional Cython extension imd._fastpath (metadata is in pyproject.toml).

The extension is optional: when Cython is missing, no C compiler works, or the
build fails for any other reason, a warning is printed and the package installs
without it; imd.fastpath then uses the pure-Python twin (imd/_fastpath_py.py).
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _warn(what, err):
    sys.stderr.write(f"WARNING: imd._fastpath not built ({what}: {err}); "
                     "imd will use the pure-Python fast path.\n")


class OptionalBuildExt(build_ext):
    """build_ext that never fails the install, and never leaves an older build of a
    failed extension behind (in build/ or, with --inplace, beside the sources)."""

    failed = ()

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
            self.failed = (*self.failed, ext.name)
            _remove(self.get_ext_fullpath(ext.name))

    def copy_extensions_to_source(self):
        for name in self.failed:
            _remove(self.get_ext_filename(name))         # the in-place copy, relative to the source root
        built = self.extensions
        self.extensions = [ext for ext in built if ext.name not in self.failed]
        try:
            super().copy_extensions_to_source()
        finally:
            self.extensions = built


def _remove(path):
    if os.path.exists(path):
        os.remove(path)


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
