"""Only for the optional C extension; everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("app._speedups", ["app/_speedups.c"], optional=True,
                             extra_compile_args=["-O2", "-Wall"])])
