"""Error replies in every shape servers use: the reason is kept, the input never is."""

from __future__ import annotations

import json

from stages.error_body import SNIPPET_CHARS, reason_of

CHUNK = (
    "The quarterly revenue of the northern division rose by twelve percent, driven by "
    "strong demand for the new line of industrial pumps."
)


def test_openai_shape() -> None:
    body = {"error": {"message": "This model's maximum context length is 8192 tokens", "type": "x"}}
    assert reason_of(json.dumps(body)) == "This model's maximum context length is 8192 tokens"


def test_older_vllm_shape() -> None:
    body = {"object": "error", "message": "max_model_len is 512", "type": "BadRequestError"}
    assert reason_of(json.dumps(body)) == "max_model_len is 512"


def test_tei_and_ollama_shape() -> None:
    body = {"error": "Input validation error: inputs too long", "error_type": "Validation"}
    assert reason_of(json.dumps(body)) == "Validation: Input validation error: inputs too long"
    assert reason_of(json.dumps({"error": "model not loaded"})) == "model not loaded"


def test_fastapi_validation_errors_keep_where_and_what_but_never_the_input() -> None:
    body = {
        "detail": [
            {
                "type": "less_than_equal",
                "loc": ["body", "dimensions"],
                "msg": "Input should be less than or equal to 384",
                "input": {"input": [CHUNK], "dimensions": 1024},
            }
        ]
    }
    reason = reason_of(json.dumps(body), sent=[CHUNK])
    assert reason == "body.dimensions: Input should be less than or equal to 384"
    assert "revenue" not in reason


def test_a_plain_text_body_that_echoes_the_input_is_scrubbed() -> None:
    body = f"Bad request: could not tokenize '{CHUNK}' (too long)"
    reason = reason_of(body, sent=["unrelated text", CHUNK])
    assert "quarterly" not in reason and "pumps" not in reason
    assert reason.startswith("Bad request: could not tokenize") and "[input]" in reason


def test_an_unknown_json_shape_drops_input_fields() -> None:
    body = {"status": "rejected", "input": [CHUNK], "why": "batch too large"}
    reason = reason_of(json.dumps(body), sent=[CHUNK])
    assert "revenue" not in reason and "batch too large" in reason


def test_secrets_are_redacted_and_the_reason_is_short() -> None:
    body = "key sk-secret-123456 rejected " + "x" * 1000
    reason = reason_of(body, secrets=["sk-secret-123456"])
    assert "sk-secret" not in reason and "[redacted]" in reason
    assert len(reason) <= SNIPPET_CHARS
    assert reason_of("") == "(empty body)"
