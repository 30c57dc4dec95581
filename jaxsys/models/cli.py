"""`jaxsys models`: list the named models of the registry and whether each is installed."""

from __future__ import annotations

import argparse


def main(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="jaxsys models", description=__doc__).parse_args(argv)
    from jaxsys.models.registry import REGISTRY, ModelNotFoundError, resolve

    for name, spec in REGISTRY.items():
        try:
            where = str(resolve(name))
        except ModelNotFoundError:
            where = f"not installed ({spec.install_hint})"
        print(f"{name}\n  {spec.description}\n  {where}")
    return 0
