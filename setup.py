"""Build script. Package metadata lives in pyproject.toml; this file exists for the optional
CUDA extension ``c3dzoo._C`` compiled from csrc/ (added by the csrc work; until csrc/ holds
sources, nothing is compiled and the ``cuda`` backend reports why it is unavailable)."""

from setuptools import setup

setup()
