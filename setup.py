"""Package discovery: every `ldm_pipeline*` package below, plus configs/ as `ldm_pipeline.configs`.

Everything else (metadata, dependencies, package data) is in pyproject.toml.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["ldm_pipeline", "ldm_pipeline.*"]), "ldm_pipeline.configs"])
