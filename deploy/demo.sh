#!/usr/bin/env bash
# cai-agent demo: the whole mission on this machine with no TEE hardware (sample TEE).
#   build → tiny model as an Ollama store → keygen → encrypt --ollama-model → dev-kbs on
#   loopback → fetch-and-decrypt --tee sample --kbc trustee into tmpfs → event log + replayed
#   RTMR3 → (if an ollama binary is available) ollama serve on loopback + a short generation.
# Everything it starts is stopped by PID; everything it creates is removed.
# Environment: CAI_OLLAMA_BIN (ollama binary; default: the `make ollama` cache path), GO.
set -euo pipefail
cd "$(dirname "$0")/.."

GO=${GO:-go}
WORK=$(mktemp -d /tmp/cai-demo.XXXXXX)
SHM=$(mktemp -d /dev/shm/cai-demo.XXXXXX)
KBS_PID= OLLAMA_PID=
cleanup() {
  local rc=$?
  for pid in $OLLAMA_PID $KBS_PID; do
    # ollama serve starts runner children: stop its whole process group.
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in $OLLAMA_PID $KBS_PID; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
  rm -rf "$WORK" "$SHM"
  exit $rc
}
trap cleanup EXIT INT TERM
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "build"
$GO build -trimpath -o "$WORK/cai-agent" ./cmd/cai-agent
A="$WORK/cai-agent"
export CAI_STATE_DIR="$WORK/state" CAI_TEE=sample

step "generate the tiny llama model as an Ollama store (model owner's machine)"
$A dev-tiny-model --ollama-models "$WORK/plain" --name cai-tiny
step "keygen + encrypt --ollama-model cai-tiny"
$A keygen --out "$WORK/model.key"
$A encrypt --key-file "$WORK/model.key" --in "$WORK/plain" --out "$WORK/encrypted" \
  --ollama-model cai-tiny --key-hint kbs:///default/model-key/cai-tiny
ls -l "$WORK/encrypted"

step "dev-kbs (Trustee RCAR 0.4.0 test server) on loopback, serving the key"
set -m # own process groups for background jobs
$A dev-kbs --listen 127.0.0.1:0 --addr-file "$WORK/kbs.addr" \
  --resource "kbs:///default/model-key/cai-tiny=@$WORK/model.key" >"$WORK/kbs.log" 2>&1 &
KBS_PID=$!
set +m
for _ in $(seq 100); do [ -s "$WORK/kbs.addr" ] && break; sleep 0.1; done
[ -s "$WORK/kbs.addr" ] || { echo "dev-kbs did not start:"; cat "$WORK/kbs.log"; exit 1; }
echo "dev-kbs listening on $(cat "$WORK/kbs.addr") (pid $KBS_PID)"

step "fetch-and-decrypt --tee sample --kbc trustee into tmpfs ($SHM/models)"
$A fetch-and-decrypt --source "$WORK/encrypted" --out "$SHM/models" \
  --kbc trustee --kbs-url "http://$(cat "$WORK/kbs.addr")" --insecure-http \
  --measure-binary "$A" --json >"$WORK/summary.json"
cat "$WORK/summary.json"; echo
find "$SHM/models" -path "$SHM/models/.cai-agent" -prune -o -type f -print

step "event log (RTMR3) and replay"
$A eventlog show
$A eventlog replay

OLLAMA=${CAI_OLLAMA_BIN:-$(make -s print-ollama-bin 2>/dev/null || true)}
if [ -z "$OLLAMA" ] || [ ! -x "$OLLAMA" ]; then
  step "no ollama binary (set CAI_OLLAMA_BIN or run 'make ollama'): skipping generation"
  exit 0
fi
if ! command -v curl >/dev/null; then
  step "curl not installed: skipping generation"
  exit 0
fi
step "ollama serve on loopback with OLLAMA_MODELS=$SHM/models"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo 11534)
mkdir -p "$WORK/home"
set -m
HOME="$WORK/home" OLLAMA_HOST="127.0.0.1:$PORT" OLLAMA_MODELS="$SHM/models" OLLAMA_NOPRUNE=1 \
  "$OLLAMA" serve >"$WORK/ollama.log" 2>&1 &
OLLAMA_PID=$!
set +m
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/api/version" >/dev/null && break; sleep 0.1; done
curl -sf "http://127.0.0.1:$PORT/api/version"; echo
curl -sf "http://127.0.0.1:$PORT/api/tags" | head -c 400; echo
step "generate (random weights: gibberish, 8 tokens)"
curl -sf "http://127.0.0.1:$PORT/api/generate" -d '{"model":"cai-tiny","prompt":"hello world","stream":false,
  "options":{"num_predict":8,"num_thread":1,"temperature":0}}' | head -c 600; echo
