"""Build script: metadata lives in setup.cfg; this declares the optional C accelerator.

``sfive_ngxlua._speedups`` decodes blocks of common-shape lines in one call; it is optional: a
machine without a compiler still installs the pure-Python package (records.py falls back).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "sfive_ngxlua._speedups",
            sources=["sfive_ngxlua/_speedups.c"],
            optional=True,
        )
    ]
)
