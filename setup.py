"""Build script: the Python package (the C++/CUDA extension is added by the kernels work)."""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["drllm", "drllm.*"]))
