#!/usr/bin/env bash
# Register every hospital's public key (<dir>/*.pub) with the SuperLink, so that their SuperNodes
# may join. Safe to run again: keys already registered are reported and skipped. Waits up to 60 s
# for the SuperLink to answer (it runs as the SuperLink unit's ExecStartPost).
#   usage: register-nodes.sh DIR [CONNECTION]
# CONNECTION is a [superlink.<name>] entry of $FLWR_HOME/config.toml (default "federation"):
#   [superlink.federation]
#   address = "127.0.0.1:9092"
#   root-certificates = "/etc/fedmedsegdiff/pki/ca.crt"
set -uo pipefail
dir=${1:?usage: register-nodes.sh DIR [CONNECTION]}
connection=${2:-federation}
flwr=${FLWR:-flwr}
status=0
for key in "$dir"/*.pub; do
  [ -e "$key" ] || continue
  for attempt in $(seq 1 30); do
    if out=$("$flwr" supernode register "$key" "$connection" 2>&1); then
      echo "registered $(basename "$key" .pub)"
      break
    fi
    if grep -qi "already" <<<"$out"; then
      echo "already registered: $(basename "$key" .pub)"
      break
    fi
    if [ "$attempt" = 30 ]; then
      echo "could not register $key: $out" >&2
      status=1
    fi
    sleep 2
  done
done
exit $status
