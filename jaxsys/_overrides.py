"""`key=value` command-line overrides for YAML configs (dotted keys, YAML-parsed values)."""

from __future__ import annotations

from typing import Any, Iterable


def set_dotted(tree: dict[str, Any], key: str, value: Any, *, error: type[Exception] = ValueError) -> None:
    """tree["a"]["b"] = value for key "a.b", creating sections; `error` if a parent is not a section."""
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise error(f"cannot set {key!r}: {p!r} is not a section")
    node[parts[-1]] = value


def dotted_overrides(tree: dict[str, Any], overrides: Iterable[str], *, error: type[Exception] = ValueError,
                     example: str = "section.key=value") -> dict[str, Any]:
    """Apply `key=value` overrides to a config dict in place (and return it); raises `error` with a
    clear message for a malformed item."""
    import yaml

    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise error(f"override {item!r} is not key=value (e.g. {example})")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        set_dotted(tree, key.strip(), value, error=error)
    return tree
