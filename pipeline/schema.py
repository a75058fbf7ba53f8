"""What pipeline.yaml may contain, once, for both the loader and the JSON Schema.

Every key is a `Key` in a table (`TOP`, `SOURCE`, `STAGE`, `POOL`, `RETRY`) and
every value is checked by a `Rule`. The loader in `pipeline.config` walks these
tables to find unknown and missing keys and calls `Rule.check`; `json_schema()`
asks the same rules for their JSON form, and a stage's `with:` keys come from
its `PARAMS` through `param_key`. Because both read one definition, the schema
an editor shows cannot promise what the loader then refuses (tests/test_schema.py
also compares the shipped pipeline.schema.json with `json_schema()`).

`python -m pipeline.schema > pipeline.schema.json` regenerates the shipped file.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.registry import known_kinds, resolve
from pipeline.stage import REQUIRED, Param

__all__ = [
    "POOL",
    "RAY",
    "RETRY",
    "SOURCE",
    "STAGE",
    "TOP",
    "WATCH",
    "Invalid",
    "Key",
    "Rule",
    "json_schema",
    "param_key",
    "schema_text",
    "write_schema",
]


class Invalid(ValueError):
    """A value broke its rule; the loader turns this into a ConfigError at the key.

    `echo` False keeps the value out of the message (it may be a pasted secret).
    """

    def __init__(self, expected: str, *, echo: bool = True) -> None:
        super().__init__(expected)
        self.echo = echo


@dataclass(frozen=True, slots=True)
class Rule:
    """What one value must be: in words for errors, in JSON for editors, and a test.

    `convert` runs after the test passes (ints become floats for number keys);
    `echo` False keeps a failing value out of error messages.
    """

    expected: str
    json: Mapping[str, Any]
    test: Callable[[Any], bool]
    convert: Callable[[Any], Any] = lambda value: value
    echo: bool = True

    def check(self, value: object) -> Any:
        """The checked value, converted; raises Invalid with `expected`."""
        try:
            ok = self.test(value)
        except (TypeError, ValueError):  # e.g. urlsplit on a malformed port
            ok = False
        if not ok:
            raise Invalid(self.expected, echo=self.echo)
        return self.convert(value)


@dataclass(frozen=True, slots=True)
class Key:
    """One key of a mapping. `default` is what the loader uses when the key is absent;
    `nullable` keys also accept an explicit null, meaning "not set"."""

    rule: Rule
    doc: str = ""
    required: bool = False
    default: Any = None
    nullable: bool = False

    def json(self) -> dict[str, Any]:
        out = dict(self.rule.json)
        if self.nullable:
            out = {"anyOf": [out, {"type": "null"}]}
        if self.doc:
            out["description"] = self.doc
        if (
            not self.required
            and _plain(self.default)
            and (self.nullable or self.default is not None)
        ):
            out["default"] = self.default
        return out


def _number(value: int | float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _plain(value: object) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def integer(minimum: float | None = None) -> Rule:
    """An int, never a bool: `True` is an int to Python but a mistake in a config."""
    low = -math.inf if minimum is None else minimum
    return Rule(
        "an integer" if minimum is None else f"an integer >= {minimum:g}",
        {"type": "integer"} | ({} if minimum is None else {"minimum": _number(minimum)}),
        lambda value: type(value) is int and value >= low,
    )


def number(minimum: float | None = None, *, exclusive: bool = False) -> Rule:
    """An int or float (loaded as float), never a bool."""
    low = -math.inf if minimum is None else minimum
    bound = {} if minimum is None else {"exclusiveMinimum" if exclusive else "minimum": minimum}
    return Rule(
        "a number" if minimum is None else f"a number {'>' if exclusive else '>='} {minimum:g}",
        {"type": "number"} | bound,
        lambda value: type(value) in (int, float) and (value > low if exclusive else value >= low),
        float,
    )


def text(expected: str = "a non-empty string", *, pattern: str | None = None) -> Rule:
    """A non-empty string; `expected` says what it stands for (a path, a name)."""
    return Rule(
        expected,
        {"type": "string", "minLength": 1} | ({} if pattern is None else {"pattern": pattern}),
        lambda value: (
            isinstance(value, str)
            and bool(value)
            and (pattern is None or re.match(pattern, value) is not None)
        ),
    )


def choice(values: tuple[str, ...]) -> Rule:
    return Rule("one of " + ", ".join(values), {"enum": list(values)}, lambda v: v in values)


def _is_http_url(value: object) -> bool:
    if not isinstance(value, str):
        return False
    parts = urlsplit(value)
    # No user:password@ part: credentials come from api_key_env, never the YAML.
    return parts.scheme in ("http", "https") and bool(parts.hostname) and "@" not in parts.netloc


def section(keys: Mapping[str, Key], expected: str = "a mapping") -> Rule:
    """A nested mapping with its own key table, which the loader then descends into."""
    return Rule(
        expected,
        {
            "type": "object",
            "additionalProperties": False,
            "required": [name for name, key in keys.items() if key.required],
            "properties": {name: key.json() for name, key in keys.items()},
        },
        lambda value: isinstance(value, dict),
    )


FLAG = Rule("true or false", {"type": "boolean"}, lambda value: type(value) is bool)
POOL_SIZE = Rule(  # "auto" is turned into the usable CPU count by the loader
    'a positive integer or "auto"',
    {"anyOf": [{"type": "integer", "minimum": 1}, {"const": "auto"}]},
    lambda value: value == "auto" or (type(value) is int and value >= 1),
)
URL = dataclasses.replace(  # checked at load, not at the first request an hour into a run
    Rule(
        "an http or https URL with a host and no user:password@ (keys come from api_key_env)",
        {"type": "string", "pattern": r"^https?://[^/?#\s@]+([/?#]|$)"},
        _is_http_url,
    ),
    echo=False,  # a URL may carry a secret; the line and key say where it is
)
ENV_NAME = dataclasses.replace(  # not echoed: people paste the key itself here
    text("the name of an environment variable (not the secret itself)", pattern=r"^[A-Za-z_]\w*$"),
    echo=False,
)
PARAMS = Rule(  # a stage's `with:`; its keys come from the stage, see `param_key`
    "a mapping of the stage's parameters",
    {"type": "object", "propertyNames": {"not": {"const": "api_key"}}},
    lambda value: isinstance(value, dict),
)
STAGE_KINDS = text("a stage kind or a package.module:ClassName path")
MODULE_PATH = r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_.]*$"

RETRY: Mapping[str, Key] = {
    "attempts": Key(integer(1), "Total tries per item, the first included.", default=5),
    "base_s": Key(number(0), "First backoff in seconds; doubles per retry.", default=0.5),
    "cap_s": Key(number(0), "Longest backoff in seconds (>= base_s).", default=30.0),
    "max_wait_s": Key(
        number(0, exclusive=True),
        "How long to wait for a server that is unavailable (refused, 502/503/504) before"
        " the run stops with exit 3; waiting costs no attempts.",
        default=180.0,
    ),
}
POOL: Mapping[str, Key] = {
    "kind": Key(choice(("process", "thread", "async")), "Default: the stage's first kind."),
    "size": Key(
        POOL_SIZE, 'Copies that run at once; "auto" = usable CPUs. The ceiling if adaptive.'
    ),
    "adaptive": Key(
        FLAG,
        "Find how many calls the server takes at once (latency, 429/503, timeouts), up to"
        " size. Default: true on async pools.",
        nullable=True,
    ),
    "own_process": Key(
        FLAG,
        "Async pools: run the stage's event loop in a process of its own, so its I/O work"
        " (HTTP, JSON, decoding replies) takes no CPU from the engine's process; a fusible"
        " thread-pool stage right after it (the store) runs in that process too.",
        default=False,
    ),
}
STAGE: Mapping[str, Key] = {
    "name": Key(text(), "Unique: labels metrics, logs and state.", required=True),
    "uses": Key(STAGE_KINDS, "An installed stage kind or a module:Class path.", required=True),
    "pool": Key(section(POOL), "Default: the stage's first pool kind and default size."),
    "queue": Key(
        integer(1),
        "Capacity of the channel feeding this stage, in batches of its batch size"
        " (default 2 x size).",
    ),
    "linger_ms": Key(
        number(0),
        "How long a worker of a batching stage waits for its batch to fill before sending"
        " it short (default 50 for stages with a batch, else 0).",
        nullable=True,
    ),
    "timeout_s": Key(number(0, exclusive=True), "Per-item time bound.", nullable=True),
    "memory_mb": Key(integer(1), "Per-worker memory cap (process pools only).", nullable=True),
    "retry": Key(section(RETRY), "Retries of transient failures."),
    "with": Key(PARAMS, "The stage's parameters (its PARAMS).", nullable=True),
}
SOURCE: Mapping[str, Key] = {
    "path": Key(text("a folder path"), "Folder of PDFs, relative to this file.", required=True),
    "glob": Key(text("a glob pattern"), "Which files under path to index.", default="**/*.pdf"),
    "prune": Key(FLAG, "Drop indexed documents whose file is gone.", default=True),
}
WATCH: Mapping[str, Key] = {
    "settle_s": Key(
        number(0),
        "A file is read once its size and mtime have been stable this long.",
        default=2.0,
    ),
    "rescan_s": Key(
        number(0, exclusive=True),
        "Walk the whole folder this often, for events that were lost.",
        default=300.0,
    ),
}
RAY: Mapping[str, Key] = {
    "address": Key(
        text("a Ray address"),
        'An existing cluster ("auto", "ray://host:10001"); default: a local Ray instance'
        " for the run, on loopback only.",
        nullable=True,
    ),
    "num_cpus": Key(integer(1), "CPUs of the local instance (default: all).", nullable=True),
    "object_store_mb": Key(
        integer(64), "Object store of the local instance (default: Ray's).", nullable=True
    ),
}
TOP: Mapping[str, Key] = {
    "source": Key(section(SOURCE), "Where the documents come from.", required=True),
    "state": Key(text("a file path"), "Progress database, relative to this file.", required=True),
    "executor": Key(
        choice(("local", "ray")),
        "local: this machine's pools and channels; ray: the same stages on a Ray cluster.",
        default="local",
    ),
    "ray": Key(section(RAY), "executor: ray: which cluster."),
    "shutdown_timeout_s": Key(number(0, exclusive=True), "SIGTERM grace period.", default=30.0),
    "watch": Key(section(WATCH), "`pipeline watch`: settling and rescans."),
    "min_free_mb": Key(
        number(0),
        "Free space the run keeps on the filesystems of its state and store: below it,"
        " intake stops, the run drains and exits 3.",
        default=256.0,
    ),
    "stages": Key(
        Rule(
            "a non-empty list of stages",
            {"type": "array", "minItems": 1, "items": section(STAGE).json},
            lambda value: isinstance(value, list) and bool(value),
        ),
        "Stages in order; each feeds the next.",
        required=True,
    ),
}


def param_key(param: Param) -> Key:
    """The table entry for one `with:` parameter, from the stage's Param."""
    rules: dict[str, Rule] = {
        "int": integer(param.minimum),
        "float": number(param.minimum),
        "str": text(),
        "bool": FLAG,
        "url": URL,
        "env": ENV_NAME,
        "path": text("a path"),
        "model": text("a model name or folder"),
    }
    return Key(
        choice(param.choices) if param.choices else rules[param.type],
        param.doc,
        required=param.default is REQUIRED,
        default=None if param.default is REQUIRED else param.default,
        nullable=param.default is None,
    )


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of pipeline.yaml for the installed stages.

    Each known `uses:` kind gets an if/then that fixes its `with:` keys and pool
    kinds; a `module:Class` stage keeps a free-form `with:`, which only the
    loader can check. Raises LookupError if an installed stage cannot be imported.
    """
    schema = copy.deepcopy(dict(section(TOP).json))
    stage = schema["properties"]["stages"]["items"]
    kinds = known_kinds()
    stage["properties"]["uses"]["anyOf"] = [
        {"enum": kinds},
        {"type": "string", "pattern": MODULE_PATH},
    ]
    stage["allOf"] = [_kind_schema(kind) for kind in kinds]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "pipeline.yaml",
        "description": "A PDF indexing pipeline: a source folder and stages joined by queues.",
        **schema,
    }


def schema_text() -> str:
    """`json_schema()` as shipped and printed: pretty, sorted keys, final newline,
    so regenerating an unchanged schema leaves the file byte for byte the same."""
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


def write_schema(path: Path) -> None:
    """Write the shipped file (pipeline.schema.json at the repository root)."""
    path.write_text(schema_text(), encoding="utf-8")


def main() -> None:
    """Print the schema, for `python -m pipeline.schema > pipeline.schema.json`."""
    sys.stdout.write(schema_text())


def _kind_schema(kind: str) -> dict[str, Any]:
    """Within a stage that uses `kind`: its `with:` keys and pool kinds.

    When a parameter is required, `with:` is too and may not be null, as the
    loader then reports the missing parameter.
    """
    cls = resolve(kind)
    params = {name: param_key(param) for name, param in cls.PARAMS.items()}
    with_schema: dict[str, Any] = dict(section(params).json)
    then: dict[str, Any] = {
        "properties": {
            "with": with_schema,
            "pool": {"properties": {"kind": {"enum": list(cls.POOLS)}}},
        }
    }
    if any(key.required for key in params.values()):
        then["required"] = ["with"]
    else:
        then["properties"]["with"] = {"anyOf": [with_schema, {"type": "null"}]}
    return {"if": {"properties": {"uses": {"const": kind}}, "required": ["uses"]}, "then": then}


if __name__ == "__main__":
    main()
