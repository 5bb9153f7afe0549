"""Grouping a repo's files into the quantization variants a user picks from, plus the files all of them need.

Naming follows the ecosystem (docs/background.md, "Variant names"):

- ONNX (transformers.js / onnx-community): ``{base}{suffix}.onnx`` with dtype suffixes (``_fp16``,
  ``_q4f16``, ``_quantized`` = q8, none = fp32), external data ``{stem}.onnx_data[_N]`` or
  ``{stem}.onnx.data``, or, in a folder (not the root) of one ONNX model, any other file there or below but
  documents, pictures and other models (a file per tensor, as torch.onnx.export writes a model over 2 GB).
- GGUF: the quant label in the file name (``Q4_K_M``, ``IQ2_XS``, ``BF16``, ``UD-Q4_K_XL``, ``Q4_0_4_4``…; the
  last match wins, as huggingface.js does), else in its folder (``Q4_K_M/model-00001-of-00002.gguf``), else
  the file's own name; split files ``-00001-of-00003.gguf`` grouped; an ``mmproj`` projector as the companion
  of each GGUF variant (its quant's, else F16, BF16, F32; one no variant takes is a variant of its own);
  importance matrices (``imatrix.gguf``: "imatrix" in a name without a quant label) no
  model: other files. A name is the file's alone, whatever is beside it (two models of one label are one
  variant, as the store names a variant from the files it holds of it).
- safetensors: single files and shards with their ``.safetensors.index.json``; a dtype infix
  (``model.fp16.safetensors``, diffusers' ``.fp16.``) names the variant, otherwise it is ``safetensors``.
- Shared: configs, tokenizers, vocabularies, chat templates — every variant needs them.
- Anything else (README, .gitattributes, legacy ``.bin`` weights, images…) is "other".
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from modeldepot.store.eviction import FORMER

__all__ = [
    "DetectedVariant",
    "Grouping",
    "files_of_other_variants",
    "former_names",
    "gguf_quant",
    "gguf_shard_names",
    "group_files",
    "is_gguf_model",
    "safetensors_shard_names",
    "variant_aliases",
    "variants_own_files",
]

# transformers.js DEFAULT_DTYPE_SUFFIX_MAPPING, longest suffix first so "_q4f16" wins over "_q4".
_ONNX_SUFFIXES: tuple[tuple[str, str], ...] = (
    ("_quantized", "q8"), ("_q4f16", "q4f16"), ("_q2f16", "q2f16"), ("_q1f16", "q1f16"), ("_uint8", "uint8"),
    ("_fp16", "fp16"), ("_int8", "int8"), ("_bnb4", "bnb4"), ("_q4", "q4"), ("_q2", "q2"), ("_q1", "q1"),
)  # fmt: skip
# What is no ONNX model's external data, beside it in its folder: documents, pictures, code, settings
_NOT_ONNX_DATA = (".md", ".txt", ".json", ".yaml", ".yml", ".py", ".png", ".jpg", ".jpeg", ".gif", ".svg",
                  ".gitattributes", ".gitignore", ".gguf", ".safetensors", ".onnx")  # fmt: skip
_ONNX_DATA = re.compile(r"^(?P<stem>.+)\.onnx(?:_data(?:_\d+)?|\.data)$")

_GGUF_NAMES = [
    "IQ1_S",
    "IQ1_M",
    "IQ2_XXS",
    "IQ2_XS",
    "IQ2_S",
    "IQ2_M",
    "IQ3_XXS",
    "IQ3_XS",
    "IQ3_S",
    "IQ3_M",
    "IQ4_NL",
    "IQ4_XS",
    "TQ1_0",
    "TQ2_0",
    "MXFP4",
    "NVFP4",
    "Q1_0",
    "Q2_0",
    "Q2_K",
    "Q3_K",
    "Q4_0",
    "Q4_1",
    "Q4_K",
    "Q5_0",
    "Q5_1",
    "Q5_K",
    "Q6_K",
    "Q8_0",
    "Q8_1",
    "Q8_K",
    "BF16",
    "F16",
    "F32",
    "F64",
]
# Qwen's own spelling (Qwen2.5-*-Instruct-GGUF: `qwen2.5-0.5b-instruct-fp16.gguf`): a variant named after the
# whole file, which neither -q fp16 nor -q F16 found (an explorer's trial)
_FP_NAMES = ["FP16", "FP32"]
# ARM repacks of Q4_0 and IQ4_NL (Q4_0_4_4.gguf beside Q4_0.gguf: another file, another variant)
_ARM_REPACKS = ["Q4_0_4_4", "Q4_0_4_8", "Q4_0_8_8", "IQ4_NL_4_4", "IQ4_NL_4_8", "IQ4_NL_8_8"]


def _quant_pattern(names: list[str]) -> re.Pattern[str]:
    return re.compile(
        r"(?<![A-Z0-9])(?P<prefix>UD-)?(?P<quant>"
        + "|".join(sorted(names, key=len, reverse=True))
        + r")(?:_(?P<size>XXS|XS|XL|S|M|L))?(?![A-Z0-9])"
    )


_GGUF_QUANT = _quant_pattern(_GGUF_NAMES + _ARM_REPACKS + _FP_NAMES)
# The labels before the repacks and the folders were told apart (0.1): the names pins and uses were recorded under
_LEGACY_GGUF_QUANT = _quant_pattern(_GGUF_NAMES)
MAX_VARIANT_NAME = 64
_NOT_IN_NAMES = re.compile(r"[^A-Za-z0-9._+-]+")
_GGUF_SPLIT = re.compile(r"^(?P<prefix>.*?)-(?P<shard>\d{5})-of-(?P<total>\d{5})\.gguf$")
_GGUF_SHARD_NAME = "{}-{:05d}-of-{:05d}.gguf"  # gguf-py's SHARD_NAME_FORMAT, llama.cpp's split path
# A sharded checkpoint's file, as huggingface_hub's serialization names it (``model-00001-of-00004``)
_SAFETENSORS_SHARD = re.compile(r"^(?P<prefix>.*?)-(?P<shard>\d{5})-of-(?P<total>\d{5})\.safetensors$")

_SAFETENSORS_DTYPE = re.compile(r"\.(?P<dtype>fp16|bf16|fp32|fp8|int8)\.safetensors(?:\.index\.json)?$")

_SHARED_NAMES = re.compile(
    r"(^|/)(config\.json|generation_config\.json|genai_config\.json|preprocessor_config\.json"
    r"|processor_config\.json|tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json"
    r"|added_tokens\.json|vocab\.(json|txt)|merges\.txt|tokenizer\.model|spiece\.model|sentencepiece\.bpe\.model"
    r"|chat_template\.(jinja|json)|[^/]*\.tiktoken|quantize_config\.json|quant_config\.json"
    r"|[^/]*_config\.json|modules\.json|config_sentence_transformers\.json)$"
)


@dataclass(frozen=True)
class DetectedVariant:
    name: str  # "q4f16", "Q4_K_M", "fp16", "safetensors"…
    kind: str  # "onnx", "gguf", "safetensors"
    files: tuple[str, ...]  # the variant's own files (the shared ones are listed apart)


@dataclass(frozen=True)
class Grouping:
    variants: tuple[DetectedVariant, ...]
    shared: tuple[str, ...]
    other: tuple[str, ...]

    def find(self, name: str) -> DetectedVariant | None:
        """The variant called ``name`` (case-insensitive: q4_k_m finds Q4_K_M), or the one variant it is an
        alias of (:func:`variant_aliases`): the names `status` shows of a commit's whole listing
        (safetensors-fp16 beside onnx-fp16) were refused by pin, rm --quant and preload once the store held
        one of the two (there, "fp16"; an explorer's trial). None when it names none, or several."""
        lowered = name.lower()
        exact = next((v for v in self.variants if v.name.lower() == lowered), None)
        if exact is not None:
            return exact
        aliased = [v for v in self.variants if lowered in variant_aliases(v)]
        return aliased[0] if len(aliased) == 1 else None

    def find_for(self, name: str, kinds: Sequence[str]) -> DetectedVariant | None:
        """:meth:`find`, for an engine that loads ``kinds`` (of "onnx", "safetensors", "gguf", in its order of
        preference): a bare precision names that engine's variant of it, as ``<kind>-<name>`` does (``fp16``
        is onnx-fp16 for onnxruntime, safetensors-fp16 for safetensors). It named what the files held called
        fp16: the ONNX file on a store that held onnx-fp16, for the safetensors engine too, and nothing on a
        fresh one, whose commit has both (an explorer's trial)."""
        exact = self.find(name)
        if exact is not None and (not kinds or exact.kind in kinds):
            return exact
        for kind in kinds:
            qualified = self.find(f"{kind}-{name}")
            if qualified is not None and qualified.kind == kind:
                return qualified
        return exact

    def names(self) -> str:
        return ", ".join(v.name for v in self.variants) or "none"

    def own_files(self, variant: DetectedVariant) -> frozenset[str]:
        """The files that go with ``variant`` alone: those no other variant lists too (a GGUF repo's mmproj
        projector, which several list, stays while one of them does)."""
        others = {path for v in self.variants if v is not variant for path in v.files}
        return frozenset(path for path in variant.files if path not in others)


def variant_aliases(variant: DetectedVariant) -> frozenset[str]:
    """The names a variant answers to, in lower case: its own, and with and without its kind. A revision
    that holds ONNX and safetensors fp16 calls them onnx-fp16 and safetensors-fp16, one that holds one of
    them calls it fp16: a pin or a use recorded under one name still finds it under the other."""
    prefix = f"{variant.kind}-".lower()
    name = variant.name.lower()
    base = name[len(prefix) :] if name.startswith(prefix) else name
    return frozenset({name, base, prefix + base})


def former_names(files: Iterable[str]) -> frozenset[str]:
    """The names, in lower case, 0.1 gave the variants of these GGUF files: the label of a file's name,
    without the ARM repacks (Q4_0_4_4 was Q4_0) nor its folder's (``Q8_0/model-00001-of-00002.gguf`` was
    ``model``), else its own name as it was. A pin recorded then under a name no variant has now keeps the
    variants it named (a pin of ``model`` left both quants unpinned once they were Q4_K_M and Q8_0, a review);
    never a lookup of a name (``Q4_0`` is Q4_0, not its repack)."""
    return frozenset(
        (_quant_label(path.rsplit("/", 1)[-1], _LEGACY_GGUF_QUANT) or _gguf_model_name(path)).lower()
        for path in files
        if is_gguf_model(path)
    )


def variants_own_files(paths: Iterable[str]) -> list[tuple[str, frozenset[str], frozenset[str]]]:
    """Each variant among ``paths``: its name, its own files (what the disk budget may evict of it) and
    the names it answers to (:func:`variant_aliases`), with its :func:`former_names` marked
    :data:`~modeldepot.store.eviction.FORMER` (what an old pin may name)."""
    grouping = group_files(paths)
    return [(v.name, own := grouping.own_files(v), variant_aliases(v) | {FORMER + name for name in former_names(own)})
            for v in grouping.variants]  # fmt: skip


def files_of_other_variants(model_file: str, paths: Iterable[str]) -> frozenset[str]:
    """The files (among ``paths``) of the variants ``model_file`` is not in, and not its own variant's too:
    what a load of it does without (``onnx/model.onnx``'s external data beside ``onnx/model_fp16.onnx``'s)."""
    variants = group_files({*paths, model_file}).variants
    own = {path for v in variants if model_file in v.files for path in v.files}
    return frozenset(
        path for v in variants if model_file not in v.files for path in v.files if path not in own
    )


def gguf_shard_names(path: str) -> list[str] | None:
    """Every shard of the split GGUF that ``path`` (a repo path or a file name) is one of, in order, in
    the same folder; None when its name is not a split shard's (``…-00002-of-00003.gguf``)."""
    folder, slash, name = path.rpartition("/")
    match = _GGUF_SPLIT.match(name)
    if match is None:
        return None
    shard, total = int(match["shard"]), int(match["total"])
    if not 1 <= shard <= total:
        return None
    return [
        f"{folder}{slash}{_GGUF_SHARD_NAME.format(match['prefix'], n, total)}" for n in range(1, total + 1)
    ]


def safetensors_shard_names(path: str) -> list[str] | None:
    """Every shard of the sharded checkpoint that ``path`` (a repo path or a file name) is one of, in
    order, in the same folder; None when its name is not a shard's."""
    folder, slash, name = path.rpartition("/")
    match = _SAFETENSORS_SHARD.match(name)
    if match is None or not 1 <= int(match["shard"]) <= int(match["total"]):
        return None
    total = int(match["total"])
    return [
        f"{folder}{slash}{match['prefix']}-{n:05d}-of-{total:05d}.safetensors" for n in range(1, total + 1)
    ]


def _onnx_dtype(stem: str) -> str:
    for suffix, dtype in _ONNX_SUFFIXES:
        if stem.endswith(suffix):
            return dtype
    return "fp32"


def _quant_label(name: str, pattern: re.Pattern[str] = _GGUF_QUANT) -> str | None:
    found = None
    for match in pattern.finditer(name.upper()):
        found = match
    if found is None:
        return None
    return (found["prefix"] or "") + found["quant"] + (f"_{found['size']}" if found["size"] else "")


def gguf_quant(path: str) -> str | None:
    """The quant label of a GGUF file's name, as huggingface.js parses it (last match wins), or else of the
    nearest folder that has one (``Q8_0/model-00001-of-00002.gguf``: the split models of several quants, each
    in its folder, were one variant, pulled and loaded together, an explorer's trial)."""
    for part in reversed(path.split("/")):
        label = _quant_label(part)
        if label is not None:
            return label
    return None


def is_gguf_model(path: str) -> bool:
    """Whether a ``.gguf`` file is a model: not a multimodal projector (``mmproj``, a companion of a
    variant) nor an importance matrix (``imatrix.gguf``, which llama-imatrix writes and repos publish beside
    their quants: it was a variant, and the model a load without a quant returned, an explorer's trial). A
    quant made with one is a model (``model-Q4_K_M-imatrix.gguf``: its name has a quant label)."""
    name = path.rsplit("/", 1)[-1]
    if not name.lower().endswith(".gguf") or "mmproj" in name.lower():
        return False
    return "imatrix" not in name.lower() or _quant_label(name) is not None


def _gguf_model_name(path: str) -> str:
    """A GGUF model's own name: its file's (a split one's prefix), without ``.gguf``."""
    name = path.rsplit("/", 1)[-1]
    split = _GGUF_SPLIT.match(name)
    return split["prefix"] if split else name[: -len(".gguf")]


def _as_variant_name(name: str) -> str:
    """``name`` as a variant's name a user can type and the control API takes (a letter or digit, then
    letters, digits and ``. _ + -``, at most 64): a file's name may hold spaces, or be 120 characters long."""
    name = _NOT_IN_NAMES.sub("-", name).lstrip("._+-") or "model"
    if len(name) <= MAX_VARIANT_NAME:
        return name
    return f"{name[: MAX_VARIANT_NAME - 9]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def _gguf_label(path: str) -> str:
    """A GGUF model's variant: its quant label, else its own name. Of the file alone, never of the others
    beside it: a name that told two models of one label apart (``X-Q4_K_M``, ``X-Instruct-Q4_K_M``) became
    ``Q4_K_M`` in a store holding one of them, where load, pin and rm then knew it no more (a review)."""
    return gguf_quant(path) or _as_variant_name(_gguf_model_name(path))


def _projector_for(label: str, files: list[str], projectors: list[str]) -> str | None:
    """The multimodal projector that goes with the GGUF model ``files`` of quant ``label``: of those in its
    folder (else of all), the one of its quant, else F16 (FP16), BF16, F32 (FP32), else the first by name."""
    folder = files[0].rpartition("/")[0] if files else ""
    near = sorted(p for p in projectors if p.rpartition("/")[0] == folder) or sorted(projectors)
    if not near:
        return None
    by_label: dict[str, str] = {}
    for path in near:
        by_label.setdefault((_quant_label(path.rsplit("/", 1)[-1]) or "").upper(), path)
    preferred = (label.upper(), "F16", "FP16", "BF16", "F32", "FP32")  # (Qwen's spelling too, a review)
    return next((by_label[want] for want in preferred if want in by_label), near[0])


def group_files(paths: Iterable[str]) -> Grouping:
    """Group repo paths into variants, shared files and the rest."""
    all_paths = sorted(set(paths))
    groups: dict[tuple[str, str], list[str]] = {}
    claimed: set[str] = set()
    onnx_by_stem: dict[str, tuple[str, str]] = {}

    for path in all_paths:
        if path.endswith(".onnx"):
            stem = path[: -len(".onnx")]
            key = ("onnx", _onnx_dtype(stem.rsplit("/", 1)[-1]))
            groups.setdefault(key, []).append(path)
            onnx_by_stem[stem] = key
            claimed.add(path)
    for path in all_paths:
        data = _ONNX_DATA.match(path)
        if data and data["stem"] in onnx_by_stem:
            groups[onnx_by_stem[data["stem"]]].append(path)
            claimed.add(path)

    gguf = [p for p in all_paths if p.lower().endswith(".gguf")]
    projectors = [p for p in gguf if "mmproj" in p.rsplit("/", 1)[-1].lower()]
    for path in gguf:
        if is_gguf_model(path):
            groups.setdefault(("gguf", _gguf_label(path)), []).append(path)
            claimed.add(path)
    if any(kind == "gguf" for kind, _ in groups):
        # One projector with each model: of its quant, else F16, BF16, F32 (each with every quant, a vision
        # repo's Q4_K_M pull moved 5.9 GB for 3.3, an explorer's trial); those no model takes, variants of their
        # own (`pull -q mmproj-F32`)
        chosen = set()
        for key in [k for k in groups if k[0] == "gguf"]:
            pick = _projector_for(key[1], groups[key], projectors)
            if pick is not None:
                groups[key].append(pick)
                chosen.add(pick)
        for path in projectors:
            if path not in chosen:
                groups.setdefault(("gguf", _as_variant_name(_gguf_model_name(path))), []).append(path)
        claimed.update(projectors)

    for path in all_paths:
        if path.endswith((".safetensors", ".safetensors.index.json")):
            dtype = _SAFETENSORS_DTYPE.search(path)
            groups.setdefault(("safetensors", dtype["dtype"] if dtype else "safetensors"), []).append(path)
            claimed.add(path)

    # External data not named after its model (torch.onnx.export of a model over 2 GB writes a file per
    # tensor, named after it; `location="weights.bin"`): in a folder (not the root) of one ONNX model, the
    # files nothing else claims are its data. Left out, a pull of the variant lacked them (the load then
    # failed), and a preload brought the graph alone into RAM.
    models_in: dict[str, list[tuple[str, str]]] = {}
    for stem, key in onnx_by_stem.items():
        models_in.setdefault(stem.rpartition("/")[0], []).append(key)

    def data_owner(path: str) -> tuple[str, str] | None:
        """The one ONNX model of the nearest folder above ``path`` that has models (the root is none)."""
        folder = path.rpartition("/")[0]
        while folder and folder not in models_in:
            folder = folder.rpartition("/")[0]
        keys = models_in.get(folder, []) if folder else []
        return keys[0] if len(keys) == 1 else None

    for path in all_paths:
        if path in claimed or _SHARED_NAMES.search(path) or path.lower().endswith(_NOT_ONNX_DATA):
            continue
        owner = data_owner(path)
        if owner is not None:
            groups[owner].append(path)
            claimed.add(path)

    shared = [p for p in all_paths if p not in claimed and _SHARED_NAMES.search(p)]
    other = [p for p in all_paths if p not in claimed and p not in shared]
    names = [name for _, name in groups]
    variants = tuple(
        # A name two kinds share ("fp16" in ONNX and in safetensors) is qualified by its kind.
        DetectedVariant(f"{kind}-{name}" if names.count(name) > 1 else name, kind, tuple(sorted(set(files))))
        for (kind, name), files in sorted(groups.items())
    )
    return Grouping(variants, tuple(shared), tuple(other))
