#!/usr/bin/env bash
# Create or update .venv with the project's pinned dependencies (called by `make test` / `make demo`).
# Re-runs only when pyproject.toml or requirements/constraints.txt changed (see the Makefile's stamp).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $($PY --version)"
  $PY -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -c requirements/constraints.txt)
# torch first, pinned, so the local CPU wheel is taken where one is offered (a CUDA build elsewhere).
"${PIP[@]}" -q torch==2.13.0
"${PIP[@]}" -e ".[app,dev]"
# PyPI's torchvision needs CUDA libraries: on a CPU-only torch it cannot be imported (and breaks
# monailabel modules that try), so remove it there.
if .venv/bin/python -c "import sys, torch; sys.exit(0 if torch.version.cuda is None else 1)"; then
  if .venv/bin/python -m pip show -q torchvision >/dev/null 2>&1; then
    echo "== CPU-only torch: removing torchvision (no CPU build exists here)"
    .venv/bin/python -m pip uninstall -y -q torchvision
  fi
fi
.venv/bin/python - <<'PY'
import importlib.util, sys, torch
print(f"== torch {torch.__version__} (cuda {torch.version.cuda}), torchvision importable: "
      f"{importlib.util.find_spec('torchvision') is not None}")
if torch.version.cuda is None and importlib.util.find_spec("torchvision") is not None:
    sys.exit("torchvision is installed next to a CPU-only torch; it cannot load here")
PY
touch .venv/.lmk3d-installed
bash scripts/install_system_tools.sh || echo "== system tools not installed; the tests that need them will skip"
