#!/usr/bin/env bash
# Make sure a virtual environment with dcml's dependencies exists and holds this checkout; print
# its path. The environment lives outside the clone (torch alone is ~5.6 GB) and is keyed by a
# hash of the dependency spec (pyproject.toml's dependency lists + constraints.txt), so every clone
# with the same spec reuses it and a dependency change gets a fresh one.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}

key=$("$python" - "$repo" <<'PY'
import hashlib, json, sys, tomllib
from pathlib import Path
repo = Path(sys.argv[1])
project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
spec = {
    "python": sys.version_info[:2],
    "dependencies": project.get("dependencies", []),
    "optional": project.get("optional-dependencies", {}),
    "constraints": (repo / "constraints.txt").read_text(),
}
print(hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16])
PY
)
root=${DCML_VENV_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/dcml/venvs}
venv=$root/$key
mkdir -p "$root"

(
  flock 9  # two clones setting up at once must not build the same environment together
  if [ ! -f "$venv/.complete" ]; then
    echo "setting up $venv (first time for this dependency spec: torch is ~5.6 GB, a few minutes)" >&2
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -c "$repo/constraints.txt" \
      setuptools wheel "$repo[test]" 2> >(grep -v "^WARNING: Location" >&2) >&2
    touch "$venv/.complete"
  fi
  # Point the environment at this checkout (editable, no dependency resolution: about a second).
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e "$repo" >&2
) 9>"$venv.lock"
echo "$venv"
