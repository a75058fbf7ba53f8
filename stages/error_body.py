"""The reason in an embedding server's error reply, whatever its shape, without the input.

Servers that speak the OpenAI API disagree on how they say no:

    OpenAI, infinity, newer vLLM   {"error": {"message": "...", "type": ..., "code": ...}}
    older vLLM                     {"object": "error", "message": "...", "type": ...}
    TEI, Ollama                    {"error": "...", "error_type": "..."}
    FastAPI validation (422)       {"detail": [{"loc": [...], "msg": "...", "input": ...}]}
                                   or {"detail": "..."}
    proxies, anything else         plain text or HTML

The reason is what a person needs in a dead letter or the exit message. The
input never is: documents may be private, and FastAPI's 422 echoes the whole
request. So `input` fields are dropped, and whatever is left is scrubbed of any
run of characters it shares with the texts that were sent.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

__all__ = ["SNIPPET_CHARS", "reason_of"]

SNIPPET_CHARS = 200
_SHINGLE = 16  # a run this long shared with the input is taken to be the input
_SHORTEST = 6  # a whole sent text shorter than a shingle is removed if at least this long
_SHOWN = "[input]"


def reason_of(body: str, *, sent: Sequence[str] = (), secrets: Sequence[str] = ()) -> str:
    """One line, at most SNIPPET_CHARS long, with input text and secrets removed."""
    try:
        message = _message(json.loads(body))
    except ValueError:
        message = body
    line = " ".join(message.split())
    for secret in secrets:
        if secret:
            line = line.replace(secret, "[redacted]")
    line = _scrub(line, sent)
    if len(line) > SNIPPET_CHARS:
        line = line[: SNIPPET_CHARS - 1] + "…"
    return line or "(empty body)"


def _message(payload: object) -> str:
    """The human part of a JSON error body, in any of the shapes above."""
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict):
            return _message(error)
        if isinstance(error, str):
            kind = payload.get("error_type")
            return f"{kind}: {error}" if isinstance(kind, str) and kind else error
        for key in ("message", "msg"):
            if isinstance(payload.get(key), str):
                return str(payload[key])
        detail = payload.get("detail")
        if isinstance(detail, str):
            return detail
        if isinstance(detail, list):
            return "; ".join(_validation(entry) for entry in detail[:5])
        shown = {k: v for k, v in payload.items() if k not in ("input", "inputs")}
        return json.dumps(shown)[:SNIPPET_CHARS]
    if isinstance(payload, str):
        return payload
    return json.dumps(payload)[:SNIPPET_CHARS]


def _validation(entry: object) -> str:
    """One FastAPI/pydantic validation error: where and what, never the input."""
    if not isinstance(entry, dict):
        return str(entry)
    where = ".".join(str(part) for part in entry.get("loc", []) if isinstance(part, str | int))
    what = entry.get("msg", "invalid")
    return f"{where}: {what}" if where else str(what)


def _scrub(line: str, sent: Sequence[str]) -> str:
    """Replace every run of `line` that also occurs in a sent text with "[input]"."""
    if len(line) < _SHINGLE or not sent:
        return line
    shingles: set[str] = set()
    for text in sent:
        flat = " ".join(text.split())
        if _SHORTEST <= len(flat) < _SHINGLE:
            line = line.replace(flat, _SHOWN)
        shingles.update(flat[i : i + _SHINGLE] for i in range(len(flat) - _SHINGLE + 1))
    covered = [False] * len(line)
    for i in range(len(line) - _SHINGLE + 1):
        if line[i : i + _SHINGLE] in shingles:
            covered[i : i + _SHINGLE] = [True] * _SHINGLE
    if not any(covered):
        return line
    out: list[str] = []
    for i, char in enumerate(line):
        if not covered[i]:
            out.append(char)
        elif i == 0 or not covered[i - 1]:
            out.append(_SHOWN)
    return "".join(out)
