# cffi's setuptools integration (cffi_modules) still needs setup.py.
from setuptools import setup

setup(cffi_modules=["native/build.py:ffibuilder"])
