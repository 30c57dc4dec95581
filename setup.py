"""Lists the subpackages of the one `jaxsys` namespace (see DESIGN.md: folders -> jaxsys.*)."""
import os

from setuptools import setup

_ROOTS = {
    "jaxsys": "jaxsys",
    "jaxsys.pallas_kernels": "pallas_kernels",
    "jaxsys.serve": "serve",
    "jaxsys.train": "train",
    "jaxsys.configs": "configs",
}


def _packages():
    found = []
    for name, folder in _ROOTS.items():
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            if "__init__.py" in filenames:
                rel = os.path.relpath(dirpath, folder)
                found.append(name if rel == "." else name + "." + rel.replace(os.sep, "."))
    return sorted(found)


setup(packages=_packages())
