#!/usr/bin/env bash
# The main job on built-in data: three synthetic, non-IID hospitals train MedSegDiff together
# with Flower (`flwr run . local`, 3 simulated SuperNodes), the server signs a release, and each
# hospital verifies it and runs the ensemble locally on its own held-out images.
# Everything goes under .work/ (runs, releases, keys, data); extra arguments are run-config
# overrides of the experiment, e.g. `bash scripts/demo.sh federation.rounds=4`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
work="$PWD/.work"
python -m server.local_simulation --flwr-home "$PWD/.work/flwr-home" --sites 3 \
  --run-config "workdir=$work" --run-config "experiment=configs/federated-fundus.yaml" \
  --run-config "overrides=$*"
release=$(ls -d "$work"/releases/fundus-v* | sort -V | tail -n 1)
key="$work/keys/release-signing.pem.pub"
medsegdiff release verify "$release" --public-key "$key"
for site in site-0 site-1 site-2; do
  echo "== $site: local ensemble inference with $(basename "$release")"
  medsegdiff --quiet evaluate --release "$release" --public-key "$key" --release-name fundus \
    --trust-file "$work/verified-releases.json" \
    --data "$work/data/synthetic-3/$site/test" --out "predictions/$site-$(basename "$release")"
done
echo "model card: $release/model-card.md"
for site in site-0 site-1 site-2; do
  echo "$site's report (open in a browser): predictions/$site-$(basename "$release")/report.html"
done
