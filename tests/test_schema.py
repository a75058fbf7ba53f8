"""The shipped JSON Schema: current, valid, and in agreement with the loader.

The schema and the loader are built from the same tables in pipeline.schema; these
tests catch the two ways they can still part: a stale pipeline.schema.json, and a
config one of them accepts while the other refuses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.registry import known_kinds
from pipeline.schema import json_schema, schema_text, write_schema
from tests.test_config import EMBED_WITH, GOOD, REAL

SHIPPED = Path(__file__).resolve().parent.parent / "pipeline.schema.json"
ENV = {"EMBEDDING_API_KEY": "k", "TOY_KEY": "k"}


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def schema_accepts(validator: jsonschema.Draft202012Validator, text: str) -> bool:
    return bool(validator.is_valid(yaml.safe_load(text)))


def loader_accepts(tmp_path: Path, text: str) -> bool:
    (tmp_path / "examples/pdfs").mkdir(parents=True, exist_ok=True)
    (tmp_path / "pdfs").mkdir(exist_ok=True)
    path = tmp_path / "pipeline.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path, env=ENV)
    except ConfigError:
        return False
    return True


def test_shipped_schema_is_current() -> None:
    assert SHIPPED.read_text(encoding="utf-8") == schema_text(), (
        "pipeline.schema.json is stale: run `python -m pipeline.schema > pipeline.schema.json`"
    )
    assert json.loads(SHIPPED.read_text(encoding="utf-8")) == json_schema()


def test_write_schema_writes_the_shipped_text(tmp_path: Path) -> None:
    write_schema(tmp_path / "schema.json")
    assert (tmp_path / "schema.json").read_text(encoding="utf-8") == schema_text()


def test_schema_is_draft_2020_12_and_closed_everywhere() -> None:
    schema = json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    stage = schema["properties"]["stages"]["items"]
    objects: list[dict[str, Any]] = [
        schema,
        schema["properties"]["source"],
        stage,
        stage["properties"]["pool"],
        stage["properties"]["retry"],
    ]
    objects += [_with_schema(rule["then"]) for rule in stage["allOf"]]
    assert all(obj["additionalProperties"] is False for obj in objects)
    assert [rule["if"]["properties"]["uses"]["const"] for rule in stage["allOf"]] == known_kinds()


def _with_schema(then: dict[str, Any]) -> dict[str, Any]:
    with_schema: dict[str, Any] = then["properties"]["with"]
    return with_schema["anyOf"][0] if "anyOf" in with_schema else with_schema


@pytest.mark.parametrize("text", [REAL, GOOD], ids=["documented", "module-path"])
def test_schema_and_loader_accept_the_good_configs(
    validator: jsonschema.Draft202012Validator, tmp_path: Path, text: str
) -> None:
    assert schema_accepts(validator, text)
    assert loader_accepts(tmp_path, text)


BROKEN = {
    "unknown top-level key": REAL.replace("state:", "stat:"),
    "unknown stage key": REAL.replace("    queue: 4", "    qeue: 4"),
    "unknown with key": REAL.replace("overlap: 200", "overlop: 200"),
    "pool size many": REAL.replace("size: 64", "size: many"),
    "pool size zero": REAL.replace("size: 64", "size: 0"),
    "queue zero": REAL.replace("queue: 4", "queue: 0"),
    "queue bool": REAL.replace("queue: 4", "queue: true"),
    "pool kind the stage lacks": REAL.replace("{kind: thread, size: 1}", "{kind: process}"),
    "unknown uses": REAL.replace("uses: text.chunk", "uses: text.chunks"),
    "required param missing": REAL.replace("model: hash-384, ", ""),
    "required with missing": REAL.replace(f"    with: {EMBED_WITH}\n", ""),
    "bad url": REAL.replace("http://127.0.0.1:8000/v1", "ftp://127.0.0.1/v1"),
    "choice": REAL.replace("collection: documents", "collection: documents, distance: cos"),
    "empty stages": REAL.split("stages:")[0] + "stages: []\n",
    "missing source": REAL.split("\n", 1)[1],
    "api_key literal": REAL.replace("api_key_env: EMBEDDING_API_KEY", "api_key: sk-secret"),
    "api_key under a module-path stage": GOOD.replace("count: 2", "api_key: sk-secret"),
    "negative timeout": REAL.replace("timeout_s: 120", "timeout_s: -1"),
    "retry attempts zero": REAL.replace("attempts: 5", "attempts: 0"),
    "env name with a dash": REAL.replace("EMBEDDING_API_KEY", "sk-pasted-key"),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_schema_and_loader_both_reject_broken_configs(
    validator: jsonschema.Draft202012Validator, tmp_path: Path, name: str
) -> None:
    text = BROKEN[name]
    assert text not in (REAL, GOOD), "the fixture edit did not apply"
    assert not schema_accepts(validator, text)
    assert not loader_accepts(tmp_path, text)
