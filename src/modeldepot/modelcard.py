"""What a model card (README.md with YAML front matter, as on the Hub) says about its repo."""

from __future__ import annotations

from typing import Any

__all__ = ["MAX_CARD_BYTES", "card_metadata"]

MAX_CARD_BYTES = 1 << 20
_FIELDS = ("pipeline_tag", "library_name", "license", "base_model")


def card_metadata(text: str) -> dict[str, Any]:
    """``pipeline_tag``, ``library_name``, ``license``, ``base_model`` and ``tags`` from the front matter.

    A card without front matter, or with front matter that is not valid YAML, says nothing.
    """
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    import yaml  # (here: 19 ms of every command's start-up otherwise)

    try:
        data = yaml.safe_load(text[3:end])
    except (yaml.YAMLError, RecursionError):  # (nested too deep for the parser: anyone's README can be)
        return {}
    if not isinstance(data, dict):
        return {}
    found: dict[str, Any] = {k: data[k] for k in _FIELDS if isinstance(data.get(k), (str, list))}
    tags = data.get("tags")
    if isinstance(tags, list):
        found["tags"] = [str(t) for t in tags if isinstance(t, (str, int, float))]
    return found
