"""Only a build hook: wheels get a copy of the plugin kernel sources (top-level plugins/, the one place they are
edited) as mamba_deploy/plugins_src/, so an installed mamba-deploy can build the TensorRT plugin with nvcc on first
use. Everything else is in pyproject.toml."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

KERNEL_SOURCES = ("selective_scan.cu", "selective_scan.h", "ssd.cu", "ssd.h", "kernel_common.cuh")


class BuildPyWithKernels(build_py):
    def run(self):
        super().run()
        if self.editable_mode:  # editable installs find the sources in the checkout's plugins/
            return
        dest = Path(self.build_lib) / "mamba_deploy" / "plugins_src"
        dest.mkdir(parents=True, exist_ok=True)
        for name in KERNEL_SOURCES:
            shutil.copy2(Path(__file__).parent / "plugins" / name, dest / name)


setup(cmdclass={"build_py": BuildPyWithKernels})
