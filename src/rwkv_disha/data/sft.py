"""``--data_type sft``: RWKV-PEFT's instruction data (``--sft_field query response --sft_split train``).

Each record gives a query and a response (the two ``--sft_field`` keys). It becomes one document in
RWKV-PEFT's SFT template (its ``SFTdataset.py``), tokenized with the World tokenizer in one go:

    Below is an instruction that describes a task. Write a response that appropriately completes the
    request.\\n\\n### Instruction:\\n{query}\\n\\n### Response:{response}\\n\\x17

Only the tokens from ``{response}`` on count toward the loss (RWKV-PEFT labels the prompt -100); ``\\x17``
is RWKV-PEFT's end-of-turn character, and no token 0 is appended. ``--data_file`` is a local ``.jsonl`` /
``.json`` file (read here; its one split is ``train``), or anything the Hugging Face ``datasets`` package
loads (a hub name such as ``meta-math/MetaMathQA``, a folder, parquet / csv), read with it when installed.
``--sft_split`` is ``datasets``' split syntax: ``train``, ``train[:1000]``, ``train[10%:20%]``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

from rwkv_disha.errors import RWKVDishaError

SFT_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{query}\n\n### Response:"
)
SFT_END = "\x17"
_SPLIT = re.compile(r"(?P<name>[A-Za-z0-9_.-]+)(?:\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?")


@dataclass(frozen=True)
class SftSpec:
    """``--sft_field QUERY RESPONSE`` and ``--sft_split``."""

    fields: tuple[str, str] = ("query", "response")
    split: str = "train"


def sft_spec(opts, given) -> SftSpec | None:
    """``opts.sft_field`` / ``opts.sft_split`` (train's data options, eval's config) checked, before any file
    is read: a spec for ``--data_type sft``, None for another type. ``given``: the option names given on
    this command line; for another type those sft flags are refused, whatever their value (they would be
    ignored); a resumed run's stored ones are not the user's to drop."""
    if opts.data_type == "sft":
        return check_sft_options(opts.sft_field, opts.sft_split)
    names = [f"--{n}" for n in ("sft_field", "sft_split") if n in given]
    if names:
        verb, them = ("applies", "it") if len(names) == 1 else ("apply", "them")
        raise RWKVDishaError(
            f"{' and '.join(names)} {verb} to --data_type sft only (this run reads --data_type "
            f"{opts.data_type}): drop {them} or use --data_type sft"
        )
    return None


def check_sft_options(fields, split: str) -> SftSpec:
    """The flags on their own."""
    fields = tuple(fields)
    if len(fields) != 2 or not all(fields) or fields[0] == fields[1]:
        raise RWKVDishaError(
            "--sft_field takes two different keys, the query's and the response's "
            f"(got {' '.join(fields) or 'none'}); e.g. --sft_field query response"
        )
    m = _SPLIT.fullmatch(split)
    if m and any(b and b.endswith("%") and abs(int(b[:-1])) > 100 for b in (m["start"], m["stop"])):
        raise RWKVDishaError(
            f"--sft_split {split!r}: percent bounds lie within -100% .. 100% (as in datasets)"
        )
    if not m:
        raise RWKVDishaError(
            f"--sft_split {split!r} is not a split: give a name with an optional slice, e.g. train, "
            "train[:1000] or train[10%:20%]"
        )
    return SftSpec((fields[0], fields[1]), split)


def split_rows(split: str, n: int) -> range:
    """The rows ``split`` (``train[a:b]``, ints or percents, Python slice rules) takes of ``n`` rows."""
    m = _SPLIT.fullmatch(split)
    assert m is not None

    def bound(text: str | None) -> int | None:
        if text is None:
            return None
        if text.endswith("%"):  # datasets' "closest" rounding: Python's round, half to even
            return round(int(text[:-1]) * n / 100)
        return int(text)

    return range(n)[slice(bound(m["start"]), bound(m["stop"]))]


def sft_segments(obj, fields: tuple[str, str]) -> list[tuple[str, bool]]:
    """One record -> ``[(prompt, False), (response + end, True)]``; ``ValueError`` names what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    query, response = fields
    missing = [k for k in fields if k not in obj]
    if missing:
        keys = ", ".join(sorted(map(str, obj))) or "none"
        raise ValueError(
            f'no "{missing[0]}" key (keys: {keys}); name the query and response keys with --sft_field'
        )
    q, a = obj[query], obj[response]
    if not isinstance(q, str) or not isinstance(a, str):
        raise ValueError(f'"{query}" and "{response}" must be strings')
    return [(SFT_PROMPT.format(query=q), False), (f"{a}\n{SFT_END}", True)]


def load_sft(path: str, spec: SftSpec):
    """``(ArrayDocs tokens, ArrayDocs answer masks, name)`` of the split's records, in file order."""
    from rwkv_disha.data.records import is_json_file
    from rwkv_disha.data.sources import ArrayDocs, load_jsonl

    if not path:
        raise RWKVDishaError("no --data_file given for --data_type sft (a .jsonl file or a datasets name)")
    if os.path.isfile(path) and is_json_file(path):
        name = _split_name(spec.split)
        if name != "train":
            raise RWKVDishaError(
                f"--sft_split {spec.split}: a local file has one split, train (train[:1000] takes its "
                "first 1000 records)"
            )
        source, masks, _ = load_jsonl(path, sft_fields=spec.fields)
        if len(source) == 0:
            raise RWKVDishaError(f"{path} holds no records: give a file of query / response records")
        rows = split_rows(spec.split, len(source))
        if rows == range(len(source)):  # the whole file: no copy
            return source, masks, f"{path} ({spec.split})"
        docs = [source.doc(i) for i in rows]
        answers = [masks.doc(i) for i in rows]
    else:
        docs, answers = _load_with_datasets(path, spec)
    if not docs:
        raise RWKVDishaError(f"--sft_split {spec.split} of {path} holds no records; widen the split")
    return ArrayDocs.from_docs(docs), ArrayDocs.from_docs(answers, np.uint8), f"{path} ({spec.split})"


def _split_name(split: str) -> str:
    m = _SPLIT.fullmatch(split)
    assert m is not None
    return m["name"]


def _load_with_datasets(path: str, spec: SftSpec):
    """Anything but a local JSON file goes through Hugging Face ``datasets``, as RWKV-PEFT does."""
    from rwkv_disha.data.records import encode_segments_doc
    from rwkv_disha.data.tokenizer import get_tokenizer

    if os.path.isfile(path):
        raise RWKVDishaError(
            f"--data_file {path}: --data_type sft reads .jsonl / .json files itself; anything else (parquet, "
            "csv, a datasets name) needs the `datasets` package"
            + ("" if _has_datasets() else ": pip install datasets")
        )
    if not _has_datasets():
        raise RWKVDishaError(
            f"--data_file {path} is not a local .jsonl / .json file: reading a Hugging Face dataset needs "
            "the `datasets` package (pip install datasets), or save the data as .jsonl"
        )
    import datasets

    try:
        table = datasets.load_dataset(path, split=spec.split)
    except Exception as e:  # the library's own errors (not found, bad split, offline) become one line
        raise RWKVDishaError(f"datasets could not load {path} split {spec.split}: {_first_line(e)}") from None
    columns = list(table.column_names)
    missing = [k for k in spec.fields if k not in columns]
    if missing:
        raise RWKVDishaError(
            f"{path} has no column {missing[0]!r} (columns: {', '.join(columns)}); name the query and "
            "response columns with --sft_field"
        )
    tok = get_tokenizer()
    docs, answers = [], []
    for i, (q, a) in enumerate(zip(table[spec.fields[0]], table[spec.fields[1]])):
        try:
            ids, mask = encode_segments_doc(
                sft_segments(dict(zip(spec.fields, (q, a))), spec.fields), "qa", tok, False
            )
        except ValueError as e:
            raise RWKVDishaError(f"{path} row {i}: {e}") from None
        docs.append(ids)
        answers.append(mask)
    return docs, answers


def _has_datasets() -> bool:
    try:
        import datasets  # noqa: F401
    except ImportError:
        return False
    return True


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
