"""The parts pyproject.toml cannot say: package discovery with web/ mapped in, and the optional C extension."""

from setuptools import Extension, find_packages, setup

setup(
    # Every app.* package, found rather than listed; the dashboard's web/ folder stays at the top of
    # the repository and is installed as app/web (app/api/app.py looks there first).
    packages=[*find_packages(include=["app", "app.*"]), "app.web"],
    package_dir={"app.web": "web"},
    # optional=True: without gcc or the Python headers the build goes on without it (pure Python).
    ext_modules=[Extension("app._speedups", ["app/_speedups.c"], optional=True, extra_compile_args=["-O2", "-Wall"])],
)
