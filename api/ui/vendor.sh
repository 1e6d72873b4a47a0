#!/usr/bin/env bash
# Re-fetch the dashboard's front-end libraries from the npm registry at pinned versions into static/vendor/, with
# their licences, and record versions and sha256 sums there. `vendor.sh --check` verifies the committed files only.
set -euo pipefail
HTMX=2.0.11
CHARTJS=4.6.1

vendor="$(cd "$(dirname "$0")" && pwd)/static/vendor"
if [[ "${1:-}" == "--check" ]]; then
  cd "$vendor" && exec sha256sum --check --strict SHA256SUMS
fi
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
cd "$scratch"
# npm pack checks each tarball against the registry's sha512 integrity before writing it.
npm pack --silent --json "htmx.org@$HTMX" "chart.js@$CHARTJS" > packed.json
mkdir htmx chartjs
tar xzf "htmx.org-$HTMX.tgz" -C htmx
tar xzf "chart.js-$CHARTJS.tgz" -C chartjs
mkdir -p "$vendor"
cp htmx/package/dist/htmx.min.js "$vendor/htmx.min.js"
cp htmx/package/LICENSE "$vendor/htmx.LICENSE"
cp chartjs/package/dist/chart.umd.min.js "$vendor/chart.umd.min.js"
cp chartjs/package/LICENSE.md "$vendor/chart.js.LICENSE.md"
python3 - "$vendor/VERSIONS.json" <<'PY'
import json, sys
packed = json.load(open("packed.json"))
json.dump({p["name"]: {"version": p["version"], "integrity": p["integrity"]} for p in packed},
          open(sys.argv[1], "w"), indent=2)
PY
cd "$vendor"
sha256sum htmx.min.js htmx.LICENSE chart.umd.min.js chart.js.LICENSE.md > SHA256SUMS
cat VERSIONS.json SHA256SUMS
