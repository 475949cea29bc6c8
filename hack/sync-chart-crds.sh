#!/usr/bin/env sh
# Copy the CRDs (single source: crds/) into the Helm chart. tests/unit/chart checks the copies are equal.
set -eu
cd "$(dirname "$0")/.."
rm -f charts/bowline/crds/*.yaml
cp crds/*.yaml charts/bowline/crds/
echo "charts/bowline/crds/ <- crds/: $(ls crds/*.yaml | xargs -n1 basename | tr '\n' ' ')"
