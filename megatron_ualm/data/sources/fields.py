"""Field mapping: which field of a corpus sample holds the caption, the transcript, the clip span.

A mapping is ``TARGET=EXPRESSION`` (``--field caption=json.caption``). The target is a field
of the record the family's converter reads (``megatron_ualm.data.records``; ``TARGETS``): ``audio``,
``start``, ``end``, ``caption``, ``rich_caption``, ``codes`` (generation); ``audio``,
``start``, ``end``, ``conversations`` / ``messages``, or ``question`` + ``answer`` from which a
one-turn conversation is built (understanding); ``transcript`` (a caption for generation, an
answer for understanding); any field, dotted for nested ones (``chosen.audio``), for chat and
preference records. The expression reads the sample as its format presents it:

- ``json.text[0]``: keys joined by dots, list items by ``[i]``; a key may hold dots itself
  (a WebDataset member ``chosen.flac`` is ``chosen.flac``), the longest matching key wins, and
  ``["a.b"]`` names one exactly;
- ``supervisions[*].text``: every item; text items are joined with single spaces;
- ``"Describe the sound."``: a JSON string, the same text for every record;
- ``json.text[0]|json.text``: alternatives, the first that finds a value;
- a trailing ``?`` makes the mapping optional (a record without the field keeps none).

A mapping that finds nothing in a record rejects the record, naming the expression, the
target and the fields the sample does have. Presets (``--preset``) hold the mappings of common
corpora; ``--fields-file`` holds a JSON object of mappings; ``--field`` flags override both.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional, Sequence

from megatron_ualm.data.errors import RecordError

class FieldError(ValueError):
    """A ``--field`` / ``--fields-file`` / ``--preset`` that cannot work (a command-line error)."""


class MappingMiss(RecordError):
    """A required mapping that finds nothing in a record."""


class NotFound(LookupError):
    """An expression that finds no value in a sample."""


TARGETS = {
    "generation": ("audio", "start", "end", "caption", "rich_caption", "rich_caption.keywords", "rich_caption.layout",
                   "rich_caption.description", "codes", "transcript"),
    "understanding": ("audio", "sound", "start", "end", "conversations", "messages", "question", "answer",
                      "transcript"),
}
"""The fields a mapping may set in each family's record; chat and preference records take any."""

TEXT_TARGETS = {
    "generation": (("caption", "rich_caption", "transcript"), "caption", "--field caption=FIELD"),
    "understanding": (("conversations", "messages", "answer", "transcript"), "answer (or conversation)",
                      "--field answer=FIELD --field question='\"Describe the sound.\"'"),
}
"""Per family: the fields of which a record needs one (the text it trains on, see ``assemble``),
what to call them in a message, and a mapping that gives one."""

TEXT_FIELDS = ("caption", "transcript", "question", "answer", "rich_caption.layout", "rich_caption.description")
"""Targets that hold one text: a mapping that finds a list there names the item to take."""

_TOKEN = re.compile(r'\[\s*(?P<index>-?\d+|\*|"(?:[^"\\]|\\.)*")\s*\]|(?P<name>[^.\[\]|]+)|(?P<dot>\.)')


@dataclass(frozen=True)
class Expression:
    """A parsed mapping expression (see the module docstring).

    Attributes:
        text: the expression as written.
        alternatives: ``("literal", value)`` or ``("path", tokens)`` each, tried in order.
        optional: a record without the field is kept (the field left out).
    """

    text: str
    alternatives: tuple
    optional: bool = False

    def evaluate(self, view: Mapping[str, Any]) -> Any:
        """The value of the first alternative that finds one.

        Raises:
            NotFound: no alternative finds a value (None counts as none).
        """
        for kind, value in self.alternatives:
            if kind == "literal":
                return value
            try:
                found = _walk(view, value, 0)
            except NotFound:
                continue
            if isinstance(found, _Each):
                texts = [v.strip() for v in found if isinstance(v, str)]
                if len(texts) == len(found):
                    found = " ".join(t for t in texts if t)
                else:
                    found = list(found)
            if found is not None:
                return found
        raise NotFound


class _Each(list):
    """The values a ``[*]`` step found (joined as text when they are all strings)."""


def _walk(value: Any, tokens: tuple, i: int) -> Any:
    if i == len(tokens):
        if value is None:
            raise NotFound
        return value
    kind, v = tokens[i]
    if kind in ("name", "key"):
        if not isinstance(value, Mapping):
            raise NotFound
        if kind == "key":
            if v not in value:
                raise NotFound
            return _walk(value[v], tokens, i + 1)
        last = i
        while last + 1 < len(tokens) and tokens[last + 1][0] == "name":
            last += 1
        for j in range(last, i - 1, -1):  # the longest key first: member names hold dots
            key = ".".join(t[1] for t in tokens[i:j + 1])
            if key in value:
                try:
                    return _walk(value[key], tokens, j + 1)
                except NotFound:
                    continue
        raise NotFound
    if not isinstance(value, (list, tuple)):  # a string is text, not a list of characters
        raise NotFound
    if kind == "index":
        if not -len(value) <= v < len(value):
            raise NotFound
        return _walk(value[v], tokens, i + 1)
    found = _Each()
    for item in value:
        try:
            found.append(_walk(item, tokens, i + 1))
        except NotFound:
            continue
    if not found:
        raise NotFound
    return found


def _parse_path(text: str, whole: str) -> tuple:
    tokens, pos, need_name = [], 0, True
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or (m.group("dot") and need_name):
            raise FieldError(f"expression {whole!r}: cannot read {text[pos:]!r}; write keys joined by dots and list "
                             'items as [0] or [*], e.g. json.text[0] or supervisions[*].text, or a JSON string "..."')
        if m.group("dot"):
            need_name = True
        elif m.group("name") is not None:
            tokens.append(("name", m.group("name").strip()))
            need_name = False
        else:
            index = m.group("index")
            if index == "*":
                tokens.append(("each", None))
            elif index.startswith('"'):
                tokens.append(("key", json.loads(index)))
            else:
                tokens.append(("index", int(index)))
            need_name = False
        pos = m.end()
    if not tokens or need_name:
        raise FieldError(f"expression {whole!r}: {text!r} is not a field path, e.g. json.caption")
    return tuple(tokens)


def parse_expression(text: str) -> Expression:
    """Parses a mapping expression (see the module docstring).

    Raises:
        FieldError: naming the expression and what a valid one looks like.
    """
    body = text.strip()
    optional = body.endswith("?")
    if optional:
        body = body[:-1].rstrip()
    alternatives = []
    for part in _split_alternatives(body, text):
        part = part.strip()
        if part.startswith('"'):
            try:
                value = json.loads(part)
            except ValueError:
                raise FieldError(f"expression {text!r}: {part} is not a JSON string (quote it as \"text\", "
                                 "escaping quotes inside with \\\")") from None
            if not isinstance(value, str):
                raise FieldError(f"expression {text!r}: a literal must be a JSON string, got {part}")
            alternatives.append(("literal", value))
        else:
            alternatives.append(("path", _parse_path(part, text)))
    return Expression(text, tuple(alternatives), optional)


def _split_alternatives(body: str, whole: str) -> list[str]:
    """``a|b`` split at ``|`` outside quotes."""
    parts, cur, quoted, escaped = [], [], False, False
    for ch in body:
        if quoted:
            cur.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
            cur.append(ch)
        elif ch == "|":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    if not body or any(not p.strip() for p in parts):
        raise FieldError(f"expression {whole!r} is empty or has an empty alternative; e.g. json.text[0]|json.text")
    return parts


def available_fields(view: Mapping[str, Any], limit: int = 40) -> str:
    """The paths that find a value in ``view``, comma-separated (``none``), for the message of a
    mapping that finds nothing.

    Lists show their first item (``supervisions[0].text``); bytes show their size.
    """
    out: list[str] = []

    def visit(value: Any, path: str, depth: int) -> None:
        if len(out) > limit:
            return
        if isinstance(value, Mapping) and value and depth < 4:
            for key, item in value.items():
                name = str(key)
                visit(item, f"{path}.{name}" if path else name, depth + 1)
        elif isinstance(value, (list, tuple)) and value and isinstance(value[0], Mapping) and depth < 4:
            visit(value[0], f"{path}[0]", depth + 1)
        elif isinstance(value, (bytes, bytearray)):
            out.append(f"{path} ({len(value)} bytes)")
        elif value is not None:
            out.append(path)

    visit(view, "", 0)
    return ", ".join(out[:limit] + (["..."] if len(out) > limit else [])) or "none"


def _set(record: dict, target: str, value: Any) -> None:
    parts = target.split(".")
    for part in parts[:-1]:
        nested = record.get(part)
        if not isinstance(nested, dict):
            nested = record[part] = {}
        record = nested
    record[parts[-1]] = value


@dataclass(frozen=True)
class FieldMap:
    """Target -> expression mappings, applied to each sample's view.

    Attributes:
        fields: ``(target, Expression)`` pairs in the order given.
        preset: the preset they started from, if any (for messages and the run key).
    """

    fields: tuple = ()
    preset: Optional[str] = None

    def get(self, target: str) -> Optional[Expression]:
        return dict(self.fields).get(target)

    def without(self, *targets: str) -> "FieldMap":
        return FieldMap(tuple((t, e) for t, e in self.fields if t not in targets), self.preset)

    def identity(self) -> dict:
        """What decides shard contents (part of the run key and of the sidecar)."""
        return {target: expr.text for target, expr in self.fields}

    def apply(self, view: Mapping[str, Any], record: dict, where: str = "the sample") -> dict:
        """``record`` (the format's default record) with every mapping applied from ``view``.

        Raises:
            MappingMiss: a required mapping finds nothing; the message lists ``view``'s fields.
        """
        for target, expr in self.fields:
            try:
                value = expr.evaluate(view)
            except NotFound:
                if expr.optional:
                    continue
                raise MappingMiss(f"the mapping {target}={expr.text} finds nothing in {where}; its fields are: "
                                  f"{available_fields(view)} (fix the expression, or end it with ? when the field "
                                  "is optional)", target) from None
            if target in TEXT_FIELDS and isinstance(value, list):
                raise MappingMiss(f"the mapping {target}={expr.text} finds a list of {len(value)} in {where}, not "
                                  f"one text: take an item, e.g. {_first_item(expr)}", target)
            _set(record, target, value)
        return record


def _first_item(expr: Expression) -> str:
    """``expr`` with ``[0]`` after each path alternative, for a message (``json.text`` -> ``json.text[0]``)."""
    body = expr.text.strip().removesuffix("?") if expr.optional else expr.text
    parts = [p.strip() for p in _split_alternatives(body, expr.text)]
    return "|".join(p if p.startswith('"') else f"{p}[0]" for p in parts)


def assemble(record: dict, family: str) -> dict:
    """The family's record from mapped fields: ``transcript`` as caption or answer; question +
    answer as a one-turn understanding conversation.

    Raises:
        RecordError: an understanding record with neither a conversation nor an answer, or an
            answer without a question.
    """
    if family == "generation" and record.get("caption") is None and record.get("transcript") is not None:
        record["caption"] = record["transcript"]
    if family == "understanding" and "conversations" not in record and "messages" not in record:
        from megatron_ualm.data.records import SOUND_MARKER

        answer = record.get("answer")
        if answer is None:
            answer = record.get("transcript")
        if answer is None:
            raise RecordError("is missing: an understanding record needs 'conversations' (or 'messages'), or an "
                              "answer (or transcript) and a question to build one, e.g. --field answer=json.caption "
                              "--field question='\"Describe the sound.\"'", "answer")
        question = record.get("question")
        if question is None:  # a mapping problem (one question for every clip, or a field), as MappingMiss
            raise MappingMiss("no question is given: add the question asked about every clip, e.g. --field "
                              "question='\"Transcribe the speech.\"' (a JSON string), or map a field", "question")
        for name, value in (("question", question), ("answer", answer)):
            if not isinstance(value, str):
                raise RecordError(f"must be text, got {type(value).__name__}", name)
        record["conversations"] = [{"from": "human", "value": f"{SOUND_MARKER}\n{question}"},
                                   {"from": "gpt", "value": answer}]
    return record


@dataclass(frozen=True)
class Preset:
    """The mappings of a common corpus as it ships.

    Attributes:
        name: ``--preset`` value.
        formats: input formats it reads (the first is the one it implies).
        about: one line for ``--help``.
        fields: family -> target -> expression.
    """

    name: str
    formats: tuple
    about: str
    fields: dict = field(default_factory=dict)


_DESCRIBE = '"Describe the sound in detail."'
PRESETS = {p.name: p for p in (
    Preset("laion-audio-630k", ("webdataset",),
           "LAION-Audio-630K WebDataset tars (key.flac + key.json with a 'text' list of captions)",
           {"generation": {"caption": "json.text[0]|json.text"},
            "understanding": {"question": _DESCRIBE, "answer": "json.text[0]|json.text"}}),
    Preset("wavcaps", ("wavcaps",),
           "WavCaps JSON metadata ({'data': [{'id', 'caption', ...}]}) beside its audio folder or zip",
           {"generation": {"audio": "id", "caption": "caption"},
            "understanding": {"audio": "id", "question": _DESCRIBE, "answer": "caption"}}),
    Preset("audiocaps-hub", ("hf-parquet",),
           "AudioCaps as Hugging Face Parquet (an 'audio' struct of bytes/path and a 'caption' column)",
           {"generation": {"audio": "audio", "caption": "caption|captions[0]"},
            "understanding": {"audio": "audio", "question": _DESCRIBE, "answer": "caption|captions[0]"}}),
    Preset("lhotse-asr", ("lhotse", "lhotse-shar"),
           "a Lhotse ASR / TTS set (cuts.jsonl.gz or Shar): the supervisions' text is the transcript",
           {"generation": {"caption": "supervisions[*].text"},
            "understanding": {"question": '"Transcribe the speech."', "answer": "supervisions[*].text"}}),
)}


def parse_field_flag(item: str) -> tuple[str, Expression]:
    """``TARGET=EXPRESSION`` of one ``--field``."""
    target, sep, expr = item.partition("=")
    target = target.strip()
    if not sep or not target or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", target):
        raise FieldError(f"--field {item!r}: expected TARGET=EXPRESSION, e.g. caption=json.caption or "
                         "caption=supervisions[0].text")
    return target, parse_expression(expr)


def build_field_map(flags: Sequence[str] = (), fields_file: Optional[str] = None, preset: Optional[str] = None,
                    family: Optional[str] = None) -> FieldMap:
    """The run's mappings: the preset's, then the file's, then the flags' (later ones win).

    Raises:
        FieldError: an unknown preset, a preset without mappings for ``family``, an unreadable
            file, or a malformed mapping.
    """
    fields: dict[str, Expression] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise FieldError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")
        family_fields = PRESETS[preset].fields.get(family)
        if family_fields is None:
            raise FieldError(f"--preset {preset} maps fields for {' and '.join(PRESETS[preset].fields)} records, not "
                             f"{family}; give --field mappings instead")
        fields.update({t: parse_expression(e) for t, e in family_fields.items()})
    if fields_file is not None:
        try:
            with open(fields_file) as f:
                blob = json.load(f)
        except OSError as err:
            raise FieldError(f"--fields-file {fields_file}: {err.strerror}") from None
        except ValueError as err:
            raise FieldError(f"--fields-file {fields_file} is not JSON ({err})") from None
        if not isinstance(blob, dict) or not all(isinstance(v, str) for v in blob.values()):
            raise FieldError(f"--fields-file {fields_file}: expected a JSON object of TARGET: EXPRESSION strings, "
                             'e.g. {"caption": "json.text[0]", "start": "json.start?"}')
        for target, expr in blob.items():
            t, e = parse_field_flag(f"{target}={expr}")
            fields[t] = e
    for item in flags:
        t, e = parse_field_flag(item)
        fields[t] = e
    known = TARGETS.get(family)
    for target, expr in fields.items():
        if known is not None and target not in known:
            close = difflib.get_close_matches(target, known, n=1)
            raise FieldError(f"--field {target}={expr.text}: {family} records have no field {target!r}"
                             + (f" (did you mean {close[0]}?)" if close else "") + f"; the targets are: "
                             + ", ".join(known))
    return FieldMap(tuple(fields.items()), preset)


def describe_presets() -> Iterator[str]:
    """One line per preset for ``--help``."""
    for p in PRESETS.values():
        yield f"{p.name} ({p.formats[0]}): {p.about}"
