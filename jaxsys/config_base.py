"""The one pydantic base of every typed configuration in jaxsys (training, graph experiments, ...).

Strict by design: an unknown key is an error that names the valid keys (never silently ignored),
sections are immutable once validated, and defaults are validated like user values.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["ConfigSection"]


class ConfigSection(BaseModel):
    """Base of every configuration section: extra keys forbidden, frozen, defaults validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
