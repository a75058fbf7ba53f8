#!/usr/bin/env bash
# make demo: start the builtin embedding server, index the sample PDFs into the
# embedded Qdrant store, run a few searches, stop the server.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
PORT="${PORT:-8000}"

$BIN/pipeline serve-embeddings --port "$PORT" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  $BIN/python -c "import httpx,sys; httpx.get('http://127.0.0.1:$PORT/health').raise_for_status()" \
    2>/dev/null && break
  sleep 0.2
done

$BIN/pipeline validate
$BIN/pipeline run --no-progress
for query in "Boeing 737 MAX flight control computer software" \
             "how do I remove the password from an encrypted PDF" \
             "explicit is better than implicit"; do
  $BIN/pipeline search -k 3 "$query"
done
