"""Property-based fuzzing of everything that reads outside input: settings files, capture records, audio.

Each reader has one contract: it gives back a good value or raises its own error
(SettingsError, SpoolError, AudioError) with a message that says what is wrong,
and never anything else, whatever the bytes. Hypothesis runs derandomized (the
same examples every run, no example database written), with no deadline, and
with example counts that keep this file well under a minute.
"""

from __future__ import annotations

import copy
import datetime as dt
import inspect
import json
import math
import re
import shutil
import struct
import tempfile
import tomllib
import types
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import numpy as np
import pytest
import soundfile
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.control import currently_in_test_context
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from heimdall_edge.audio import SAMPLE_RATE, Audio, AudioError, read_audio
from heimdall_edge.settings import BUILTIN_WAKE_WORDS, Settings, SettingsError, load_settings
from heimdall_edge.spool.errors import SpoolError
from heimdall_edge.spool.record import RECORD_KEYS, CaptureRecord
from heimdall_edge.spool.store import Spool

REPO = Path(__file__).resolve().parents[1]
# Hypothesis keeps a cache (.hypothesis/); keep it out of the repository.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "heimdall-edge-hypothesis")
EXAMPLE_CONFIG = REPO / "config.example.toml"
PACKAGED_WAV = REPO / "heimdall_edge" / "data" / "what_time_is_it.wav"


def outcome(name: str) -> None:
    """Count an outcome in Hypothesis' statistics (--hypothesis-show-statistics)."""
    if currently_in_test_context():
        event(name)


def fuzz(max_examples: int) -> Any:
    """Hypothesis settings for CI: the same examples every run, no database, no deadline."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,  # tmp_path is shared by the examples on purpose
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


# =============================================================================================
# Settings files
# =============================================================================================

SECTIONS: dict[str, type[BaseModel]] = {
    name: field.annotation
    for name, field in Settings.model_fields.items()
    if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
}
TOP_LEVEL_KEYS = [name for name in Settings.model_fields if name not in SECTIONS]
SECTION_KEYS = sorted({key for model in SECTIONS.values() for key in model.model_fields})
# pydantic-settings' own keyword arguments (_env_file, _secrets_dir, _cli_parse_args...):
# a config file must not be able to pass them.
INIT_KWARGS = [
    name for name in inspect.signature(Settings.__init__).parameters if name.startswith("_")
]


def toml_string(text: str) -> str:
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def toml_value(value: Any) -> str:
    """One TOML value, inline (arrays and inline tables on one line)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items())
        return "{" + inner + "}" if inner else "{}"
    raise TypeError(f"no TOML for {value!r}")


def toml_document(doc: dict[str, Any]) -> str:
    """A TOML document: plain keys first, then a [table] per nested dict (recursively)."""
    lines: list[str] = []

    def emit(table: dict[str, Any], path: list[str]) -> None:
        for key, value in table.items():
            if not isinstance(value, dict):
                lines.append(f"{toml_string(key)} = {toml_value(value)}")
        for key, value in table.items():
            if isinstance(value, dict):
                header = ".".join(toml_string(part) for part in [*path, key])
                lines.append(f"[{header}]")
                emit(value, [*path, key])

    emit(doc, [])
    return "\n".join(lines) + "\n"


def same(a: Any, b: Any) -> bool:
    """Equality where NaN equals NaN (TOML round trips need it)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


# Keys: the real ones, misspellings and strangers, and pydantic-settings' init arguments.
# No "\n" in keys: the error message is checked line by line.
key_text = st.text(
    alphabet=st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)), max_size=12
)
any_key = st.one_of(
    st.sampled_from(TOP_LEVEL_KEYS + SECTION_KEYS + list(SECTIONS) + INIT_KWARGS),
    key_text,
    st.sampled_from(SECTION_KEYS).map(lambda k: k.upper()),
    st.sampled_from(SECTION_KEYS).map(lambda k: k + "s"),
)
interesting_numbers = st.sampled_from(
    [0, 1, -1, 2, 3, 17, 27, 28, 30, 64, 100, 500, 999, 1000, 16000, 48000, 600_000, 600_001,
     2**31, 2**63 - 1, -(2**63), 10**30, 0.0, -0.0, 0.5, 1e-300, 1e300, 59.99, 60.0, 60.000001]
)  # fmt: skip
scalars = st.one_of(
    st.booleans(),
    st.integers(),
    interesting_numbers,
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(["both", "voice", "button", "int8", "pcm_16000", "AES256", "INFO", "en", ""]),
    st.datetimes(
        timezones=st.none() | st.just(dt.UTC) | st.just(dt.timezone(dt.timedelta(hours=-7)))
    ),
    st.dates(),
    st.times(),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_key, inner, max_size=4),
    max_leaves=10,
)


@st.composite
def settings_documents(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            section = draw(st.sampled_from(sorted(SECTIONS)))
            keys = st.one_of(st.sampled_from(sorted(SECTIONS[section].model_fields)), any_key)
            doc[section] = draw(st.dictionaries(keys, values, max_size=5))
        else:
            doc[draw(any_key)] = draw(values)
    return doc


def doc_paths(doc: dict[str, Any], prefix: str = "") -> set[str]:
    paths = set()
    for key, value in doc.items():
        path = f"{prefix}{key}"
        paths.add(path)
        if isinstance(value, dict):
            paths |= doc_paths(value, path + ".")
    return paths


def check_settings_error(message: str, doc: dict[str, Any] | None) -> None:
    """The message says the TOML is invalid, or names every bad key (one line each)."""
    if "is not valid TOML" in message:
        return
    assert doc is not None, f"valid TOML refused without naming a key:\n{message}"
    if "[secrets] table" in message:
        assert "secrets" in doc
        return
    header, *problems = message.split("\n")
    assert header.startswith("invalid settings ("), message
    problems = [line for line in problems if line.startswith("  ")]
    assert problems, message
    paths = doc_paths(doc)
    for line in problems:
        named = line[2:]
        assert any(
            named.startswith(path) and named[len(path) : len(path) + 1] in (":", " ", ".")
            for path in paths
        ), f"{line!r} names no key of the document {sorted(paths)!r}"


def load_or_refuse(path: Path, doc: dict[str, Any] | None) -> Settings | None:
    try:
        loaded = load_settings(path)
    except SettingsError as exc:
        outcome("refused: invalid TOML" if "not valid TOML" in str(exc) else "refused: names keys")
        check_settings_error(str(exc), doc)
        return None
    outcome("loaded")
    assert isinstance(loaded, Settings)
    return loaded


@fuzz(400)
@given(doc=settings_documents())
@example(doc={"_env_file": "/etc/passwd"})  # would read it as a dotenv file
@example(doc={"_secrets_dir": "/"})
@example(doc={"_cli_parse_args": True})  # would parse the process's own argv
@example(doc={"__pydantic_self__": []})
@example(doc={"secrets": {"openai_api_key": "sk-in-the-file"}})
def test_any_settings_document_loads_or_names_the_bad_key(
    tmp_path: Path, doc: dict[str, Any]
) -> None:
    text = toml_document(doc)
    assert same(tomllib.loads(text), doc), "the fuzzer's TOML writer is wrong"
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    loaded = load_or_refuse(path, doc)
    if loaded is not None:
        assert not any(key.startswith("_") for key in doc), f"{doc!r} loaded"


@fuzz(200)
@given(
    raw=st.one_of(
        st.binary(max_size=300),
        st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.text(alphabet="[]=\"'.,{}#\n abc123-_\\", max_size=120).map(str.encode),
        st.just(EXAMPLE_CONFIG.read_bytes()).flatmap(
            lambda data: st.tuples(st.integers(0, len(data)), st.binary(max_size=8)).map(
                lambda cut: data[: cut[0]] + cut[1] + data[cut[0] + len(cut[1]) :]
            )
        ),
    )
)
def test_raw_bytes_as_a_settings_file_are_valid_or_called_invalid_toml(
    tmp_path: Path, raw: bytes
) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(raw)
    try:  # read the way load_settings reads it (universal newlines)
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        doc = None
    load_or_refuse(path, doc)


def _bounds(metadata: list[Any]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for item in metadata:
        if isinstance(item, FieldInfo):
            found |= _bounds(item.metadata)
            continue
        for name in ("ge", "gt", "le", "lt", "pattern"):
            if getattr(item, name, None) is not None:
                found[name] = getattr(item, name)
    return found


def valid_values(annotation: Any, metadata: list[Any]) -> st.SearchStrategy[Any]:
    """Values a TOML file may give a settings field, read from the field's own type and bounds."""
    origin = get_origin(annotation)
    if origin is Annotated:
        base, *extra = get_args(annotation)
        return valid_values(base, [*metadata, *extra])
    if origin in (Union, types.UnionType):
        arms = [arm for arm in get_args(annotation) if arm is not type(None)]  # TOML has no null
        return st.one_of(*(valid_values(arm, metadata) for arm in arms))
    if origin is Literal:
        return st.sampled_from(get_args(annotation))
    bounds = _bounds(metadata)
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        low = bounds.get("ge", bounds["gt"] + 1 if "gt" in bounds else -(2**63))
        high = bounds.get("le", bounds["lt"] - 1 if "lt" in bounds else 2**63 - 1)
        return st.integers(low, high)
    if annotation is float:
        return st.floats(
            min_value=bounds.get("ge", bounds.get("gt")),
            max_value=bounds.get("le", bounds.get("lt")),
            exclude_min="gt" in bounds,
            exclude_max="lt" in bounds,
            allow_nan=False,
            allow_infinity=False,
        )
    if annotation is str:
        pattern = bounds.get("pattern")
        if pattern is None:
            return st.text(max_size=30)
        body = pattern.removeprefix("^").removesuffix("$")
        fitting = st.from_regex(body, fullmatch=True).filter(lambda s: "\n" not in s)
        if pattern.endswith("$"):
            return fitting
        return st.tuples(
            fitting, st.text("abcdefghijklmnopqrstuvwxyz0123456789./:-", max_size=20)
        ).map("".join)
    if annotation is Path:
        return st.text("abcdefghijklmnopqrstuvwxyz0123456789/._-", min_size=1, max_size=30)
    raise AssertionError(f"no strategy for settings type {annotation!r}: extend valid_values")


FIELDS: list[tuple[str | None, str, FieldInfo]] = [
    (None, name, field)
    for name, field in Settings.model_fields.items()
    if name not in SECTIONS and name != "secrets"
] + [
    (section, name, field)
    for section, model in SECTIONS.items()
    if section != "secrets"
    for name, field in model.model_fields.items()
]


CHECKED_ON_DISK: dict[tuple[str | None, str], st.SearchStrategy[Any]] = {
    # Any string is a type match, but only a built-in name, "" or a real model file is valid.
    ("listening", "wake_word"): st.sampled_from([*BUILTIN_WAKE_WORDS, ""]),
    # Any string is a type match, but only a region's shape in one of AWS's partitions is valid.
    ("sync", "region"): st.sampled_from(
        ["eu-west-1", "us-gov-west-1", "cn-north-1", "il-central-1"]
    ),
    # Any http(s) URL matches the pattern, but the captures go over plain http only to loopback.
    **{
        (None, name): st.one_of(
            st.text("abcdefghijklmnopqrstuvwxyz0123456789./:-", max_size=20).map(
                "https://".__add__
            ),
            st.sampled_from(
                ["http://127.0.0.1:5000", "http://localhost:4566", "http://[::1]:9000"]
            ),
        )
        for name in ("s3_endpoint_url", "dynamodb_endpoint_url")
    },
}


@st.composite
def valid_mutations(draw: st.DrawFn) -> tuple[dict[str, Any], list[tuple[str | None, str, Any]]]:
    doc = tomllib.loads(EXAMPLE_CONFIG.read_text())
    chosen = draw(
        st.lists(st.sampled_from(FIELDS), min_size=1, max_size=12, unique_by=lambda f: (f[0], f[1]))
    )
    changes = []
    for section, name, field in chosen:
        strategy = CHECKED_ON_DISK.get((section, name))
        if strategy is None:
            strategy = valid_values(field.annotation, list(field.metadata))
        value = draw(strategy)
        (doc.setdefault(section, {}) if section else doc)[name] = value
        changes.append((section, name, value))
    sync = doc.get("sync", {})
    if sync.get("credentials") == "iot":  # valid only with a whole identity, named by its thing
        for name, value in IOT_IDENTITY.items():
            sync.setdefault(name, value)
        doc["device_id"] = sync["iot_thing_name"]
        changes = [change for change in changes if change[:2] != (None, "device_id")]
    return doc, changes


IOT_IDENTITY = {
    "iot_endpoint": "c2ab.credentials.iot.eu-west-1.amazonaws.com",
    "iot_role_alias": "heimdall-sync",
    "iot_thing_name": "kitchen-pi",
    "iot_cert": "/etc/heimdall-edge/iot/certificate.pem.crt",
    "iot_key": "/etc/heimdall-edge/iot/private.pem.key",
}


def test_config_example_loads_as_is(tmp_path: Path) -> None:
    loaded = load_settings(EXAMPLE_CONFIG)
    assert loaded.listening.mode == "both" and loaded.sync.quota_mb == 2048.0


@fuzz(200)
@given(mutation=valid_mutations())
def test_example_config_with_values_changed_within_range_loads(
    tmp_path: Path, mutation: tuple[dict[str, Any], list[tuple[str | None, str, Any]]]
) -> None:
    doc, changes = mutation
    path = tmp_path / "config.toml"
    path.write_text(toml_document(doc), encoding="utf-8")
    try:
        loaded = load_settings(path)
    except SettingsError as exc:
        raise AssertionError(f"in-range values refused: {changes!r}\n{exc}") from None
    for section, name, value in changes:
        if section is None and name in ("state_dir", "models_dir"):
            continue  # the test environment sets HEIMDALL_STATE_DIR / HEIMDALL_MODELS_DIR
        got = getattr(getattr(loaded, section) if section else loaded, name)
        assert got == (Path(value) if isinstance(got, Path) else value), (section, name)


# =============================================================================================
# Capture records
# =============================================================================================

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([0, -1, 2**63, 10**400, -(10**400)]),
    st.floats(),
    st.text(max_size=30),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
SHA = "ab" * 32
VALID_RECORD: dict[str, Any] = {
    "schema_version": 1,
    "capture_id": "20261126T231416839Z-8f54af49",
    "device_id": "heimdall-0123456789ab",
    "created_at": "2026-11-26T23:14:16.839Z",
    "trigger": "button",
    "files": {
        "audio.wav": {"bytes": 95084, "sha256": SHA},
        "frame-00.jpg": {"bytes": 9, "sha256": SHA},
    },
    "transcript": "what time is it",
    "reply": "It's 11:14 PM.",
    "engines": {"stt": "faster-whisper", "reply": "offline", "tts": "piper"},
    "timings_ms": {"listen": 2220.0, "keep": 1.2, "transcribe": 286},
    "status": "complete",
    "error": None,
    "sync_state": "pending",
    "extra": {"later": [1, 2]},
}
# Near misses, field by field: what a bug, a newer version or a hand edit might write.
NEAR_MISSES: dict[str, st.SearchStrategy[Any]] = {
    "schema_version": st.sampled_from([0, -1, 2, 10**100, 1.0, True, "1", None]),
    "capture_id": st.one_of(
        st.sampled_from(
            ["", "20261126T231416839Z-8F54AF49", "20261126T231416839Z-8f54af4", "../x"]
        ),
        st.from_regex(r"\d{8}T\d{9}Z-[0-9a-f]{8}", fullmatch=False),
    ),
    "device_id": st.sampled_from(["", 0, None, "x" * 1000]),
    "created_at": st.one_of(
        st.sampled_from(
            [
                "",
                "yesterday",
                "2026-11-26",
                "2026-11-26T23:14:16",
                "0001-01-01T00:00:00+01:00",
                "9999-12-31T23:59:59-01:00",
                "0001-01-01T00:00:00Z",
                "9999-12-31T23:59:59.999999Z",
                "2026-02-30T00:00:00Z",
                "2026-11-26T23:14:16+24:00",
                "2026-11-26T23:14:16\x00Z",
            ]
        ),
        st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
        st.datetimes().map(lambda d: d.isoformat()),
    ),
    "trigger": st.sampled_from(["Button", "", None, ["button"], "both"]),
    "files": st.one_of(
        st.dictionaries(
            st.sampled_from(
                ["audio.wav", ".hidden", "capture.json", "a/b", "", "x" * 101, "ok.jpg"]
            ),
            st.one_of(
                json_values,
                st.fixed_dictionaries({"bytes": json_values, "sha256": json_values}),
                st.fixed_dictionaries(
                    {
                        "bytes": st.integers(),
                        "sha256": st.sampled_from([SHA, SHA.upper(), SHA[:-1], ""]),
                    }
                ),
            ),
            max_size=3,
        ),
        json_values,
    ),
    "timings_ms": st.one_of(
        st.dictionaries(
            st.text(max_size=5),
            st.one_of(
                st.sampled_from([10**400, -(10**400), 2**1024, True, float("nan"), float("inf")]),
                json_values,
            ),
            max_size=3,
        ),
        json_values,
    ),
    "engines": st.one_of(
        st.dictionaries(st.text(max_size=5), json_values, max_size=3), json_values
    ),
    "status": st.sampled_from(["done", "", None, 1]),
    "sync_state": st.sampled_from(["Synced", "syncing", None, 0]),
    "extra": json_values,
    "transcript": json_values,
    "reply": json_values,
    "error": json_values,
}


def check_record_outcome(data: Any, field: str | None = None) -> CaptureRecord | None:
    """from_dict gives a record or a SpoolError naming the field (`field`, when one was mutated)."""
    try:
        record = CaptureRecord.from_dict(data)
    except SpoolError as exc:
        outcome("SpoolError")
        message = str(exc)
        assert message.startswith("capture record"), message
        if field is not None:
            names = (f"'{field}'", "file") if field == "files" else (f"'{field}'", field)
            assert any(name in message for name in names), f"{message!r} does not name {field!r}"
        elif isinstance(data, dict) and any(key not in data for key in RECORD_KEYS):
            assert "missing" in message
        return None
    outcome("record")
    assert isinstance(record, CaptureRecord)
    record.to_dict()  # what was accepted can be written back
    return record


@fuzz(300)
@given(data=json_values)
def test_from_dict_on_any_json_value(data: Any) -> None:
    check_record_outcome(data)


@fuzz(300)
@given(data=st.fixed_dictionaries({key: json_values for key in RECORD_KEYS}))
def test_from_dict_on_records_of_arbitrary_field_values(data: dict[str, Any]) -> None:
    check_record_outcome(data)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("timings_ms", {"listen": 10**400}),  # no float holds it
        ("timings_ms", {"listen": float("nan")}),
        ("created_at", "0001-01-01T00:00:00+01:00"),  # in UTC it is year 0
        ("created_at", "9999-12-31T23:59:59-01:00"),  # in UTC it is year 10000
        ("files", {"audio.wav": {"bytes": True, "sha256": SHA}}),
        ("schema_version", True),
    ],
)
def test_from_dict_edge_values_name_their_field(field: str, value: Any) -> None:
    record = copy.deepcopy(VALID_RECORD) | {field: value}
    assert check_record_outcome(record, field) is None


@fuzz(500)
@given(
    field=st.sampled_from(sorted(NEAR_MISSES)),
    data=st.data(),
)
def test_from_dict_on_a_valid_record_with_one_field_changed(
    field: str, data: st.DataObject
) -> None:
    record = copy.deepcopy(VALID_RECORD)
    assert check_record_outcome(record) is not None
    record[field] = data.draw(NEAR_MISSES[field], label=field)
    check_record_outcome(record, field)


@fuzz(100)
@given(
    drop=st.lists(st.sampled_from(RECORD_KEYS), min_size=1, unique=True),
    unknown=st.dictionaries(
        st.text(max_size=8).filter(lambda k: k not in RECORD_KEYS), json_values, max_size=3
    ),
)
def test_from_dict_names_the_missing_fields_and_ignores_unknown_ones(
    drop: list[str], unknown: dict[str, Any]
) -> None:
    record = copy.deepcopy(VALID_RECORD) | unknown
    assert CaptureRecord.from_dict(record).transcript == "what time is it"  # newer fields: ignored
    for key in drop:
        del record[key]
    with pytest.raises(SpoolError) as caught:
        CaptureRecord.from_dict(record)
    assert all(key in str(caught.value) for key in drop)


def _flip(data: bytes, position: int, value: int) -> bytes:
    if not data:
        return bytes([value])
    position %= len(data)
    return data[:position] + bytes([value]) + data[position + 1 :]


def record_bytes_fuzz(original: bytes) -> st.SearchStrategy[bytes]:
    """What a damaged capture.json might hold: noise, cuts, flips, other JSON, deep nesting."""
    return st.one_of(
        st.binary(max_size=200),
        st.just(b""),
        st.integers(0, len(original)).map(lambda n: original[:n]),
        st.tuples(st.integers(0, 10**6), st.integers(0, 255)).map(
            lambda flip: _flip(original, *flip)
        ),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.sampled_from(RECORD_KEYS).flatmap(
            lambda key: NEAR_MISSES.get(key, json_values).map(
                lambda v, key=key: json.dumps(
                    {**json.loads(original), key: v}, default=str
                ).encode()
            )
        ),
        st.integers(500, 200_000).map(lambda n: b"[" * n),  # deeper than the JSON parser recurses
        st.integers(500, 200_000).map(lambda n: b'{"a":' * n),
        st.sampled_from(
            [
                b"\xff\xfe\x00",
                b"\xef\xbb\xbf{}",
                "{}".encode("utf-16"),
                b"null",
                b"[]",
                b"\x00" * 64,
            ]
        ),
    )


@fuzz(80)
@given(data=st.data())
def test_spool_quarantines_a_capture_whose_record_is_fuzzed_and_keeps_the_others(
    tmp_path: Path, data: st.DataObject
) -> None:
    root = Path(tempfile.mkdtemp(dir=tmp_path)) / "spool"
    try:
        with Spool(root) as spool:
            kept = [
                spool.create(
                    device_id="d1",
                    trigger="button",
                    audio_wav=b"RIFF" + bytes([i]) * 64,
                    frames=[b"jpeg"],
                )
                for i in range(3)
            ]
            spool.update(kept[1].capture_id, transcript="hello", status="complete")
        victim = kept[1].capture_id
        record_path = root / "captures" / victim / "capture.json"
        fuzzed = data.draw(record_bytes_fuzz(record_path.read_bytes()), label="capture.json")
        record_path.write_bytes(fuzzed)

        with Spool(root) as spool:  # must not raise, whatever capture.json holds
            report = spool.recovered
            listed = {r.capture_id for r in spool.list()}
            for other in (kept[0], kept[2]):
                assert other.capture_id in listed
                assert spool.verify(other.capture_id) == []
            outcome("kept" if victim in listed else "quarantined")
            if victim in listed:  # the bytes still make a whole, valid record of this capture
                assert report.quarantined == 0
                assert spool.verify(victim) == []
            else:
                assert report.quarantined == 1
                assert not (root / "captures" / victim).exists()
                assert (root / "quarantine" / victim / "capture.json").read_bytes() == fuzzed
            assert spool.counts()["pending"] == len(listed)
    finally:
        shutil.rmtree(root.parent, ignore_errors=True)


# =============================================================================================
# Audio files
# =============================================================================================


def wav_file(
    fmt: int, channels: int, rate: int, bits: int, data: bytes, declared: int | None
) -> bytes:
    """A RIFF/WAVE file with whatever header fields it is given (sizes may lie)."""
    align = (channels * bits // 8) & 0xFFFF
    fmt_chunk = struct.pack(
        "<HHIIHH", fmt, channels, rate, (rate * align) & 0xFFFFFFFF, align, bits
    )
    size = len(data) if declared is None else declared
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt_chunk)) + fmt_chunk
    body += b"data" + struct.pack("<I", size) + data
    return b"RIFF" + struct.pack("<I", len(body) & 0xFFFFFFFF) + body


wav_headers = st.builds(
    wav_file,
    fmt=st.sampled_from([0, 1, 2, 3, 6, 7, 0x11, 0x55, 0xFFFE, 0xFFFF]),
    channels=st.sampled_from([0, 1, 2, 3, 8, 255, 65535]),
    rate=st.one_of(
        st.sampled_from(
            [0, 1, 3, 100, 4000, 8000, 11025, 16000, 22050, 44100, 48000, 96000, 384_000]
        ),
        st.integers(0, 2**32 - 1),
    ),
    bits=st.sampled_from([0, 1, 4, 8, 12, 16, 20, 24, 32, 48, 64]),
    data=st.one_of(
        st.binary(max_size=2000),
        st.lists(
            st.sampled_from([0.0, 1.0, -1.0, 1e30, float("nan"), float("inf"), float("-inf")]),
            max_size=64,
        ).map(lambda xs: struct.pack(f"<{len(xs)}f", *xs)),
        st.lists(st.sampled_from([float("nan"), 1e300, -1.0]), max_size=32).map(
            lambda xs: struct.pack(f"<{len(xs)}d", *xs)
        ),
    ),
    declared=st.one_of(st.none(), st.sampled_from([0, 1, 2**31, 2**32 - 1])),
)


def _real_files() -> dict[str, bytes]:
    """Small real files to mutate: the packaged WAV, and the same speech as FLAC and OGG."""
    audio = read_audio(PACKAGED_WAV)
    samples = np.frombuffer(audio.pcm, dtype="<i2")[: SAMPLE_RATE // 2]
    files = {".wav": PACKAGED_WAV.read_bytes()[:20_000]}
    for suffix, fmt in ((".flac", "FLAC"), (".ogg", "OGG")):
        with tempfile.NamedTemporaryFile(suffix=suffix) as out:
            soundfile.write(out.name, samples, SAMPLE_RATE, format=fmt)
            files[suffix] = Path(out.name).read_bytes()
    return files


REAL_FILES = _real_files()


@st.composite
def mutated_real_file(draw: st.DrawFn) -> tuple[str, bytes]:
    suffix = draw(st.sampled_from(sorted(REAL_FILES)))
    data = bytearray(REAL_FILES[suffix])
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "zero-run"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[at : at + draw(st.integers(1, 4096))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        else:
            data[at : at + 64] = bytes(min(64, len(data) - at))
    return suffix, bytes(data)


audio_inputs = st.one_of(
    st.tuples(st.sampled_from([".wav", ".flac", ".ogg"]), st.binary(max_size=3000)),
    st.tuples(st.sampled_from([".wav", ".flac"]), wav_headers),
    st.tuples(
        st.sampled_from([".flac", ".wav"]), st.binary(max_size=500).map(lambda b: b"fLaC" + b)
    ),
    mutated_real_file(),
)


@fuzz(400)
@given(case=audio_inputs)
@example(
    case=(".wav", wav_file(3, 1, 16000, 32, struct.pack("<3f", float("nan"), 1.0, -1.0), None))
)
@example(
    case=(".wav", wav_file(3, 2, 16000, 32, struct.pack("<2f", float("inf"), float("-inf")), None))
)
@example(case=(".wav", wav_file(1, 1, 1, 16, bytes(2000), None)))  # "1 Hz": 16000-fold
@example(case=(".wav", wav_file(1, 1, 48000, 16, bytes(2), None)))  # one sample at 48 kHz
@example(case=(".wav", wav_file(1, 1, 16000, 16, bytes(20), 2**32 - 1)))  # lying data size
def test_read_audio_on_fuzzed_bytes_gives_audio_or_audio_error(
    tmp_path: Path, case: tuple[str, bytes]
) -> None:
    suffix, data = case
    path = tmp_path / f"fuzzed{suffix}"
    path.write_bytes(data)
    with warnings.catch_warnings():
        # NaN cast to int16 is undefined: decoding must not produce it (numpy warns when it does).
        warnings.simplefilter("error", RuntimeWarning)
        try:
            audio = read_audio(path)
        except AudioError as exc:
            outcome("AudioError")
            assert str(path) in str(exc), str(exc)
            return
    outcome("Audio")
    assert isinstance(audio, Audio)
    assert audio.sample_rate == SAMPLE_RATE
    assert audio.pcm and len(audio.pcm) % 2 == 0
    # Whatever the header says, a small file never turns into an absurd amount of audio.
    assert len(audio.pcm) <= 400 * max(len(data), 1), (len(data), len(audio.pcm))


def test_writer_of_the_fuzzer_round_trips_its_special_values() -> None:
    doc = {
        "a": float("nan"), "b": -float("inf"), "c": 'q"\\\x00\x7f\u2028', "d": [1, {"e": []}],
        "f": {"g": {"h": dt.datetime(1, 1, 1, tzinfo=dt.UTC)}}, "": 10**30,
    }  # fmt: skip
    assert same(tomllib.loads(toml_document(doc)), doc)
    assert re.fullmatch(r'"\\u0000"', toml_string("\x00"))
