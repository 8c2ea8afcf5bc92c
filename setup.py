"""Package discovery for the layout quantkit keeps.

``convert/``, ``quantize/`` and ``validate/`` sit at the top of the repository and install as
``quantkit.convert``, ``quantkit.quantize`` and ``quantkit.validate``, so nothing claims a top-level
module named ``validate``; ``recipes/`` installs as ``quantkit.recipes`` with its YAML files as
package data. Every package below those folders is found here: a new subpackage ships without
editing a list.
"""

from __future__ import annotations

from setuptools import find_packages, setup

ROOTS = {
    "quantkit": "quantkit",
    "quantkit.convert": "convert",
    "quantkit.quantize": "quantize",
    "quantkit.validate": "validate",
    "quantkit.recipes": "recipes",
}

packages = []
for name, folder in ROOTS.items():
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]

setup(package_dir=ROOTS, packages=sorted(set(packages)))
