# setuptools reads everything from pyproject.toml; this file only hands cffi's
# builder to setuptools so that ringd._native is compiled at install time.
from setuptools import setup

setup(cffi_modules=["native/build_native.py:ffibuilder"])
