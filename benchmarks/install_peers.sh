#!/usr/bin/env bash
# Installs the optional peer libraries the benchmark suite compares against (higher, TorchOpt,
# learn2learn) beside an already installed torch, from the package index, without ever letting pip
# replace torch: every install is --no-deps.
#
#   bash benchmarks/install_peers.sh            # all three
#   PEERS="higher torchopt" bash benchmarks/install_peers.sh
#
# Why it is not a plain `pip install`: learn2learn 0.2.0 pins nothing but pulls torchvision/gym and a
# different torch, and its shipped Cython-generated C files do not compile on Python >= 3.11
# (`longintrepr.h`). We regenerate them from the sdist's .pyx sources with Cython 3 and build with
# --no-build-isolation. Importing learn2learn needs torchvision; a torchvision wheel whose compiled
# ops do not match the installed torch fails at import (`operator torchvision::nms does not exist`):
# fastmaml.bench.peers registers placeholder schemas for those ops before importing learn2learn
# (MAML never calls them).
set -euo pipefail

PY=${PYTHON:-python}
if [[ "$PY" == */* ]]; then PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY"); fi  # the learn2learn build cds
PEERS=${PEERS:-"higher torchopt learn2learn"}
PIP=("$PY" -m pip install --no-deps)

TORCH_VERSION=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')
echo "torch ${TORCH_VERSION} (kept as is)"

for peer in $PEERS; do
  case "$peer" in
    higher)
      "${PIP[@]}" "higher==0.2.1" ;;
    torchopt)
      # pure-Python path; its compiled extension may not load against this torch (then unused)
      # (graphviz: the pure-Python package, imported by torchopt.visual at import time)
      "${PIP[@]}" "torchopt==0.7.3" "optree>=0.4.1" graphviz ;;
    learn2learn)
      # gym: imported by learn2learn/__init__ (learn2learn.gym); the last gym release, pure Python;
      # requests and scipy: imported by learn2learn's data and vision modules at import time
      "${PIP[@]}" "cython>=3" "gym==0.26.2" gym-notices cloudpickle requests charset-normalizer idna urllib3 \
        certifi scipy
      # torchvision matching torch's minor version (torch 2.M -> torchvision 0.(M+15)); only imported
      MINOR=$(echo "$TORCH_VERSION" | cut -d. -f2)
      "${PIP[@]}" "torchvision==0.$((MINOR + 15)).*" || "${PIP[@]}" torchvision
      WORK=$(mktemp -d)
      trap 'rm -rf "$WORK"' EXIT
      "$PY" -m pip download --no-deps --no-binary :all: --no-build-isolation "learn2learn==0.2.0" -d "$WORK"
      tar xzf "$WORK"/learn2learn-0.2.0.tar.gz -C "$WORK"
      SRC="$WORK/learn2learn-0.2.0"
      rm -rf "$SRC/.eggs"
      (cd "$SRC" && "$PY" -m cython -3 --directive embedsignature=True learn2learn/data/*.pyx)
      "$PY" -m pip install --no-deps --no-build-isolation "$SRC" ;;
    *)
      echo "unknown peer '$peer' (expected higher, torchopt, learn2learn)" >&2; exit 2 ;;
  esac
done

"$PY" -c 'import torch; print("torch still", torch.__version__)'
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m fastmaml.bench.peers 2>/dev/null
