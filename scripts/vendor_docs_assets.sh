#!/usr/bin/env bash
# Rebuild rlhf_tasks/data/docs_assets/vendor/ from the npm registry: the exact packages
# pinned in package.json / package-lock.json (`npm ci`), only the files Great
# Expectations' Data Docs pages load, with each package's license.  The result is checked
# in, so neither installs nor clusters need npm or a CDN.  Run it when GX's pages change
# (tests/test_validation.py fails on a CDN URL that no rule rewrites).
set -euo pipefail
cd "$(dirname "$0")/../rlhf_tasks/data/docs_assets"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp package.json package-lock.json .npmrc "$work/"
(cd "$work" && npm ci --ignore-scripts --no-audit --no-fund > /dev/null)
rm -rf vendor
python3 - "$work/node_modules" <<'PY'
import json, shutil, sys
from pathlib import Path
modules, out = Path(sys.argv[1]), Path("vendor")
files = json.loads(Path("files.json").read_text())
for rel in files:
    src = modules / rel
    targets = sorted(src.rglob("*")) if src.is_dir() else [src]
    for path in targets:
        if path.is_file():
            dest = out / path.relative_to(modules)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
print(f"vendor/: {sum(1 for p in out.rglob('*') if p.is_file())} files")
PY
