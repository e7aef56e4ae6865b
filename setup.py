"""The build: pyproject.toml says everything but one step. setuptools copies the package into
build/lib/ and puts in the wheel whatever that folder holds, so a second ``pip install .`` in a
clone shipped the modules deleted since the first (pypa/setuptools#1871): here the package's
copy there is removed before each build."""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class FreshBuildPy(build_py):
    """``build_py`` that starts from no copy of the package in the build folder."""

    def run(self) -> None:
        for package in self.packages or ():
            if "." not in package:  # the top-level folder holds the subpackages
                shutil.rmtree(Path(self.build_lib, package), ignore_errors=True)
        super().run()


setup(cmdclass={"build_py": FreshBuildPy})
