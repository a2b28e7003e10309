#!/usr/bin/env bash
# ./run.sh            create/use .venv, install, train configs/default.py, evaluate, recommend
# ./run.sh test       install the dev extras, lint (ruff), run the test suite
# ./run.sh [train] FLAGS extra flags for python -m twotower_jax.main (e.g. --config.seed=1)
set -euo pipefail
cd "$(dirname "$0")"
venv="${TWOTOWER_VENV:-.venv}"
python="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"

install() {  # install the package with the given extras, once per pyproject.toml version
  local extras="$1" stamp
  stamp="$venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)-${extras:-core}"
  if [ ! -f "$stamp" ]; then
    python -m pip install -q --upgrade pip
    python -m pip install -q -e ".${extras:+[$extras]}"
    touch "$stamp"
  fi
}

cmd="${1:-train}"
case "$cmd" in
  -*) cmd=train ;;             # ./run.sh --config.seed=1: flags for training
  *) [ $# -gt 0 ] && shift ;;
esac
case "$cmd" in
  test)
    install "dev,tfds,faiss"
    python -m ruff check twotower_jax tests benchmarks configs
    exec python -m pytest -q -n auto "$@"  # one worker per core (pytest-xdist)
    ;;
  train)
    install ""
    workdir="${WORKDIR:-runs/default-$(date +%Y%m%d-%H%M%S)}"
    exec python -m twotower_jax.main --config configs/default.py --workdir "$workdir" "$@"
    ;;
  *)
    echo "usage: ./run.sh [train [FLAGS...] | test [PYTEST ARGS...]]" >&2
    exit 2
    ;;
esac
