#!/usr/bin/env bash
# Create one virtualenv per peer model under experiments/.venvs/<peer>, with exact versions.
#
#   bash experiments/peers/setup_envs.sh            # nequix and mace (skips a venv that already works)
#   bash experiments/peers/setup_envs.sh sevennet   # the SevenNet-0 teacher used to label data (issue 6)
#   bash experiments/peers/setup_envs.sh mace       # one peer
#   FORCE=1 bash experiments/peers/setup_envs.sh    # delete and rebuild
#
# Environment: PYTHON (interpreter for the venvs, default python3), NEQUIX_JAX (default 0.10.1;
# 0.10.2 has a CPU miscompilation, jax-ml/jax#39103).
#
# Pitfalls handled here (see /work/shared/docs/stack_notes.md, Part 2):
#  * nequix's metadata requires jax[cuda12] on Linux, so it is installed with --no-deps and its
#    runtime dependencies are listed by hand (wandb / wandb-osh are training-only and left out).
#  * torch==2.13.0 is installed first on its own, so that pip picks the local CPU wheel
#    (find-links) and no CUDA wheels; mace-torch is then installed with torch pinned again.
#  * mace-torch pins e3nn 0.4.4, whose `from e3nn import o3` fails on torch 2.13 unless `mace`
#    is imported first; the import check below imports mace first.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENVS="$(cd "$HERE/.." && pwd)/.venvs"
PYTHON="${PYTHON:-python3}"
NEQUIX_JAX="${NEQUIX_JAX:-0.10.1}"
FORCE="${FORCE:-0}"

# Versions shared by both venvs (same as the project's own stack).
COMMON=(numpy==2.4.6 ase==3.29.0 matscipy==1.3.1 psutil)

NEQUIX_DEPS=(
  "jax[cpu]==${NEQUIX_JAX}" "jaxlib==${NEQUIX_JAX}"
  equinox==0.13.8 e3nn-jax==0.21.0 jraph==0.0.6.dev0 optax==0.2.8
  cloudpickle h5py pyyaml tqdm
)
NEQUIX_CHECK="import nequix, jax, jraph, e3nn_jax, equinox, matscipy; \
assert jax.__version__ == '${NEQUIX_JAX}', jax.__version__; \
from nequix.calculator import NequixCalculator; \
print('nequix ok, jax', jax.__version__)"

SEVENNET_CHECK="import sevenn, torch; from sevenn.calculator import SevenNetCalculator; \
assert torch.__version__.startswith('2.13.0'), torch.__version__; \
SevenNetCalculator('7net-0', device='cpu'); print('sevennet ok, torch', torch.__version__)"

MACE_CHECK="import mace; from mace.calculators import MACECalculator; from mace.modules import ScaleShiftMACE; \
import torch; from e3nn import o3; assert torch.__version__.startswith('2.13.0'), torch.__version__; \
print('mace ok, torch', torch.__version__)"

log() { printf '[setup_envs] %s\n' "$*"; }

pipq() {  # $1 = venv dir, rest = pip install args; hides pip's notes about the local mirror dirs
  local venv="$1"; shift
  "$venv/bin/python" -m pip install -q "$@" 2>&1 \
    | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
}

check_env() {  # $1 = venv dir, $2 = python snippet; returns 0 if the venv works
  [[ -x "$1/bin/python" ]] && "$1/bin/python" -c "$2" >/dev/null 2>&1
}

make_venv() {  # $1 = venv dir
  if [[ "$FORCE" == "1" && -d "$1" ]]; then
    log "FORCE=1: removing $1"
    rm -rf "$1"
  fi
  if [[ ! -x "$1/bin/python" ]]; then
    log "creating venv $1 with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$1"
  fi
}

setup_nequix() {
  local venv="$VENVS/nequix"
  if [[ "$FORCE" != "1" ]] && check_env "$venv" "$NEQUIX_CHECK"; then
    log "nequix: $venv already works, skipped"
    return 0
  fi
  local t0=$SECONDS
  make_venv "$venv"
  log "nequix: installing CPU jax ${NEQUIX_JAX} and nequix's runtime dependencies"
  pipq "$venv" "${COMMON[@]}" "${NEQUIX_DEPS[@]}"
  log "nequix: installing nequix==0.4.5 with --no-deps (its metadata asks for jax[cuda12])"
  pipq "$venv" --no-deps nequix==0.4.5
  if ! "$venv/bin/python" -c "$NEQUIX_CHECK" 2>/dev/null; then
    log "nequix: import check FAILED in $venv"
    return 1
  fi
  if "$venv/bin/python" -m pip freeze | grep -qi nvidia; then
    log "nequix: WARNING: an nvidia wheel entered the venv"
  fi
  log "nequix: done in $((SECONDS - t0)) s ($(du -sh "$venv" | cut -f1))"
}

setup_mace() {
  local venv="$VENVS/mace"
  if [[ "$FORCE" != "1" ]] && check_env "$venv" "$MACE_CHECK"; then
    log "mace: $venv already works, skipped"
    return 0
  fi
  local t0=$SECONDS
  make_venv "$venv"
  log "mace: installing torch==2.13.0 first (CPU wheel)"
  pipq "$venv" torch==2.13.0
  log "mace: installing mace-torch==0.3.16 (e3nn 0.4.4 pinned by mace)"
  pipq "$venv" torch==2.13.0 mace-torch==0.3.16 e3nn==0.4.4 "${COMMON[@]}"
  if ! "$venv/bin/python" -c "$MACE_CHECK" 2>/dev/null; then
    log "mace: import check FAILED in $venv"
    return 1
  fi
  if "$venv/bin/python" -m pip freeze | grep -qi nvidia; then
    log "mace: WARNING: an nvidia wheel entered the venv"
  fi
  log "mace: done in $((SECONDS - t0)) s ($(du -sh "$venv" | cut -f1))"
}

setup_sevennet() {  # teacher for labelling (SevenNet-0 weights ship inside the sevenn wheel)
  local venv="$VENVS/sevennet"
  if [[ "$FORCE" != "1" ]] && check_env "$venv" "$SEVENNET_CHECK"; then
    log "sevennet: $venv already works, skipped"
    return 0
  fi
  local t0=$SECONDS
  make_venv "$venv"
  log "sevennet: installing torch==2.13.0 first (CPU wheel)"
  pipq "$venv" torch==2.13.0
  log "sevennet: installing sevenn==0.13.0"
  pipq "$venv" torch==2.13.0 sevenn==0.13.0 "${COMMON[@]}"
  if ! "$venv/bin/python" -c "$SEVENNET_CHECK" 2>/dev/null; then
    log "sevennet: import check FAILED in $venv"
    return 1
  fi
  log "sevennet: done in $((SECONDS - t0)) s ($(du -sh "$venv" | cut -f1))"
}

mkdir -p "$VENVS"
peers=("$@")
[[ ${#peers[@]} -eq 0 ]] && peers=(nequix mace)
status=0
for p in "${peers[@]}"; do
  case "$p" in
    nequix) setup_nequix || status=1 ;;
    mace) setup_mace || status=1 ;;
    sevennet) setup_sevennet || status=1 ;;
    *) log "unknown peer '$p' (known: nequix mace sevennet)"; status=1 ;;
  esac
done
for p in "${peers[@]}"; do
  if [[ -x "$VENVS/$p/bin/python" ]]; then
    log "$p versions: $("$VENVS/$p/bin/python" -m pip freeze 2>/dev/null \
      | grep -iE '^(sevenn|nequix|jax|jaxlib|equinox|e3nn|e3nn-jax|jraph|mace-torch|torch|numpy|ase|matscipy)==' \
      | tr '\n' ' ')"
  fi
done
exit $status
