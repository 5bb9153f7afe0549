"""What a model card (README.md with YAML front matter, as on the Hub) says about its repo."""

from __future__ import annotations

import datetime
import math
from collections.abc import Iterable, Mapping
from typing import Any

from modeldepot.validation import MAX_TAGS, is_label

__all__ = [
    "FILE_TAGS",
    "MAX_CARD_BYTES",
    "UPSTREAM_TAGS",
    "card_from_data",
    "card_metadata",
    "file_tags",
    "labels",
    "repo_card",
    "upstream_card",
]

MAX_CARD_BYTES = 1 << 20
_FIELDS = ("pipeline_tag", "library_name", "license", "base_model")
# The card's key for the tags the files imply: not the README's, so not in the card data the Hub gives
FILE_TAGS = "file_tags"
# The card's key for the tags an upstream gave a repo pulled from it (the Hub's own, derived from its card and
# more: ``region:us``, ``arxiv:...``), listed as the repo's tags; not the README's
UPSTREAM_TAGS = "upstream_tags"
# Tags the Hub gives a repo for the formats of its files, whatever its card says (``filter=gguf`` finds
# every GGUF repo there): each is the files' extension
_FORMAT_TAGS = ("safetensors", "gguf", "onnx")


def file_tags(paths: Iterable[str]) -> list[str]:
    """The format tags of a revision with files ``paths`` (``safetensors``, ``gguf``, ``onnx``)."""
    extensions = {
        name.rsplit(".", 1)[1].lower() for name in (p.rsplit("/", 1)[-1] for p in paths) if "." in name
    }
    return [tag for tag in _FORMAT_TAGS if tag in extensions]


def upstream_card(pipeline_tag: str | None, library_name: str | None, tags: Iterable[str],
                  gated: object = False, card_data: Mapping[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """A card from an upstream's description of a repo (the Hub's, a node's), as :func:`repo_card` has it:
    its ``cardData`` (``card_data``, checked: :func:`card_from_data`) with its tags kept apart
    (:data:`UPSTREAM_TAGS`; a mirror's and a pull's card was made of the tags alone: ``language``,
    ``datasets``, ``model-index`` lost, and ``en``, ``dataset:x`` in the card's own tags, an explorer's
    trial). Without card data, the tags the upstream derived from the card put back where they came from
    (``license:mit`` is the card's ``license``, ``base_model:X`` its ``base_model``; the library and
    pipeline tag are fields of their own) and its format tags apart, so that a node that pulled a repo
    describes it as the one it came from (its card data had ``tags: [license:mit]`` and no license)."""
    tags = list(tags)
    if card_data:
        given = {**card_data, "pipeline_tag": card_data.get("pipeline_tag") or pipeline_tag,
                 "library_name": card_data.get("library_name") or library_name,
                 FILE_TAGS: [t for t in tags if t in _FORMAT_TAGS], UPSTREAM_TAGS: tags, "gated": gated}  # fmt: skip
        return {key: value for key, value in given.items() if value}
    derived = {pipeline_tag, library_name}
    licenses = [t.split(":", 1)[1] for t in tags if t.startswith("license:")]
    # (``base_model:quantized:X`` names a relation, not the base: kept as a tag, it is listed as it came)
    bases = [t.split(":", 1)[1] for t in tags if t.startswith("base_model:") and t.count(":") == 1]
    taken = {f"license:{name}" for name in licenses} | {f"base_model:{name}" for name in bases}
    card: dict[str, Any] = {
        "pipeline_tag": pipeline_tag,
        "library_name": library_name,
        "license": licenses[0] if len(licenses) == 1 else licenses,
        "base_model": bases[0] if len(bases) == 1 else bases,
        "tags": [t for t in tags if t not in _FORMAT_TAGS and t not in derived and t not in taken],
        FILE_TAGS: [t for t in tags if t in _FORMAT_TAGS],
        "gated": gated,
    }
    return {key: value for key, value in card.items() if value}


def repo_card(readme: str | None, paths: Iterable[str]) -> dict[str, Any]:
    """What a revision's README (its text, None without one) and files say of the repo: :func:`card_metadata`,
    and the files' format tags under :data:`FILE_TAGS`."""
    card = card_metadata(readme) if readme is not None else {}
    tags = file_tags(paths)
    return {**card, FILE_TAGS: tags} if tags else card


def card_metadata(text: str) -> dict[str, Any]:
    """The front matter, as the Hub's ``cardData`` gives it (``language``, ``datasets``, ``model-index``...:
    only five keys were kept, and ``card_data.language`` was None, an explorer's trial), its values made
    JSON's; ``pipeline_tag``, ``library_name``, ``license`` and ``base_model`` kept only as a name or a list,
    ``tags`` as a list of names. Never ``gated``, a repo's setting and not its README's to make.

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
    return card_from_data(data)


def card_from_data(data: object) -> dict[str, Any]:
    """A card's front matter, parsed (a README's, or an upstream's ``cardData``), as :func:`card_metadata`
    keeps it: the values JSON's, bounded, and the names checked."""
    if not isinstance(data, dict):
        return {}
    found: dict[str, Any] = {}
    budget = [
        _CARD_VALUES
    ]  # (YAML aliases repeat one value as often as they like: 280 bytes made 53 MB, a review)
    for key, value in data.items():
        if (
            not isinstance(key, str)
            or key in _NOT_THE_CARDS
            or (key in _FIELDS and not isinstance(value, (str, list)))
        ):
            continue
        made = _json_value(value, _CARD_DEPTH, budget)
        if made is not _DROPPED:
            found[key] = made
    found.pop("tags", None)
    tags = data.get("tags")
    if isinstance(tags, list):
        found["tags"] = [str(t) for t in tags if isinstance(t, (str, int, float))]
    # What a node lists as the repo's tags (views.hub_tags) passes the rules an upstream's tags do (labels:
    # printable, one line, 200 characters at most): a card's terminal escapes went to every Hub client, and
    # every other modeldepot refused the repo, its tags invalid (a security trial)
    for key in (*_FIELDS, "tags", "language", "datasets"):
        if key in found:
            value = found[key]
            kept = labels(value)[: MAX_TAGS // 2]
            if isinstance(value, list) and kept:
                found[key] = kept
            elif isinstance(value, str) and kept:
                found[key] = kept[0]
            else:
                del found[key]
    return found


def labels(value: Any) -> list[str]:
    """The valid labels (:func:`~modeldepot.validation.validate_label`) ``value`` gives, a name or a list."""
    return [item for item in (value if isinstance(value, list) else [value]) if isinstance(item, str)
            and item and is_label(item)]  # fmt: skip


_NOT_THE_CARDS = ("gated", FILE_TAGS, UPSTREAM_TAGS)  # a repo's setting; the node's own keys
_CARD_DEPTH = 32  # levels of nesting kept of a front matter value (model-index is five deep)
# Values (and characters of text, by the thousand) kept of a front matter, at most: a README's own, 1 MiB at
# most, holds fewer; past it (aliases repeating a value) the rest is dropped
_CARD_VALUES = 100_000
_DROPPED = object()


def _json_value(value: Any, depth: int, budget: list[int]) -> Any:
    """``value`` as JSON has it (YAML dates as ISO text, keys as text); what cannot be, nests deeper than
    ``depth``, or comes once ``budget[0]`` values were taken, is dropped."""
    budget[0] -= 1 + (len(value) >> 10 if isinstance(value, str) else 0)
    if budget[0] < 0:
        return _DROPPED
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    if depth <= 0:
        return _DROPPED
    if isinstance(value, dict):
        items = ((str(k), _json_value(v, depth - 1, budget)) for k, v in value.items())
        return {k: v for k, v in items if v is not _DROPPED}
    if isinstance(value, (list, tuple)):
        return [v for v in (_json_value(item, depth - 1, budget) for item in value) if v is not _DROPPED]
    return _DROPPED
