"""Packaging shim: everything is declared in pyproject.toml.

The C++/CUDA extension in csrc/ is compiled at first use (torch.utils.cpp_extension.load, ninja,
cached) or ahead of time with `fastmaml build`, so installing never needs a compiler or CUDA.
"""
from setuptools import setup

setup()
