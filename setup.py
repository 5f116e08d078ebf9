"""
Only the C extension is declared here (setup.cfg cannot declare one);
everything else is in setup.cfg.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("txjournal._speedups", ["txjournal/_speedups.c"], extra_compile_args=["-O2"]),
    ],
)
