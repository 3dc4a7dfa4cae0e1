"""Test-only plugin: an entry point that rebuilds the resource keyed ``plugin_expert``."""

from typing import Any


def build_expert(placeholder: Any) -> Any:
    from lang_dqn import UnpicklableExpert

    name = placeholder.hint.get("model", "plugin")
    return UnpicklableExpert(name=str(name))
