#!/usr/bin/env bash
# End-to-end on kind: build the images, install the chart, apply a pool and a
# serving, wait for Ready, send chat requests through the router, check that a
# repeated prefix is served from cache and that agent metrics move, uninstall.
#
# Needs: docker (with a running engine), kind, and the repo's .venv (helm, kubectl).
# GPU nodes are used when `nvidia-smi` works and the NVIDIA container toolkit is set
# up for docker; otherwise the fleet runs CPU agents (examples/local.yaml).
#
#   e2e/run.sh            # create cluster kvmarina-e2e, run, delete it
#   KEEP_CLUSTER=1 e2e/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
CLUSTER=${CLUSTER:-kvmarina-e2e}
NS=${NS:-kvmarina-system}
TAG=${TAG:-e2e}
TIMEOUT=${TIMEOUT:-600s}

step() { printf '\n==> %s\n' "$*"; }
cleanup() {
  if [[ -z "${KEEP_CLUSTER:-}" ]]; then kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

for tool in docker kind helm kubectl; do
  command -v "$tool" >/dev/null || { echo "e2e: $tool is missing"; exit 2; }
done
docker info >/dev/null 2>&1 || { echo "e2e: docker is installed but no docker engine answers"; exit 2; }

GPU=0
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then GPU=1; fi

step "kind cluster $CLUSTER (gpu=$GPU)"
if [[ $GPU == 1 ]]; then
  kind create cluster --name "$CLUSTER" --config e2e/kind-gpu.yaml --wait 120s
else
  kind create cluster --name "$CLUSTER" --wait 120s
fi

step "build and load images"
docker build --target slim -t "kvmarina-slim:$TAG" .
docker build --target cuda -t "kvmarina-cuda:$TAG" .
kind load docker-image --name "$CLUSTER" "kvmarina-slim:$TAG" "kvmarina-cuda:$TAG"

step "helm install"
helm install kvmarina charts/kvmarina --namespace "$NS" --create-namespace --wait --timeout "$TIMEOUT" \
  --set operator.image.repository=kvmarina-slim --set operator.image.tag="$TAG" \
  --set images.router.repository=kvmarina-slim --set images.router.tag="$TAG" \
  --set images.agent.repository=kvmarina-cuda --set images.agent.tag="$TAG" \
  --set images.engine.repository=kvmarina-cuda --set images.engine.tag="$TAG" \
  --set images.pullPolicy=Never --set operator.image.pullPolicy=Never

step "apply the pool and the serving"
if [[ $GPU == 1 ]]; then
  kubectl apply -f examples/pool.yaml -f examples/serving.yaml
  SERVING=llama-tiny; POOL=default
else
  kubectl apply -f examples/local.yaml
  SERVING=tiny; POOL=local
fi
kubectl wait --for=condition=Ready "kvcachepool/$POOL" --timeout="$TIMEOUT"
kubectl -n default wait --for=condition=Ready "modelserving/$SERVING" --timeout="$TIMEOUT"

step "send chat requests through the router"
kubectl -n default port-forward "svc/$SERVING-router" 18080:80 >/dev/null 2>&1 &
PF=$!
trap 'kill $PF 2>/dev/null || true; cleanup' EXIT
sleep 3
SYSTEM=$(printf 'You are a careful assistant. %.0s' {1..40})
ask() {
  curl -sf http://127.0.0.1:18080/v1/chat/completions -H 'content-type: application/json' \
    -d "{\"model\":\"$SERVING\",\"max_tokens\":8,\"messages\":[{\"role\":\"system\",\"content\":\"$SYSTEM\"},{\"role\":\"user\",\"content\":\"$1\"}]}"
}
ask "first question" >/dev/null
cached=$(ask "second question" | python3 -c 'import json,sys; print(json.load(sys.stdin)["usage"]["prompt_tokens_details"]["cached_tokens"])')
echo "cached tokens on the repeated prefix: $cached"
[[ "$cached" -gt 0 ]] || { echo "e2e: the repeated system prompt was not served from cache"; exit 1; }

step "agent metrics moved"
AGENT=$(kubectl -n "$NS" get pods -l app.kubernetes.io/component=agent -o name | head -1)
kubectl -n "$NS" exec "$AGENT" -- python3 -c \
  'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:7470/metrics").read().decode())' \
  | grep -E '^kvmarina_agent_lookups_total' | awk '{ if ($2 > 0) ok=1 } END { exit ok ? 0 : 1 }'

step "uninstall"
kubectl delete -f examples/ --ignore-not-found --wait=true || true
helm uninstall kvmarina --namespace "$NS" --wait
echo "e2e: passed"
