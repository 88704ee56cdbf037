"""Build script: metadata lives in setup.cfg; this refreshes the plugin cache."""

from setuptools import setup

setup()
