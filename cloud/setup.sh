#!/usr/bin/env bash
# The cloud tasks' `setup:`: builds ~/venv on the Python the tests run on, with the uv that SkyPilot
# installs on every machine it starts (~/.local/bin/uv), and installs this checkout into it.
#   bash cloud/setup.sh            # from the workdir (SkyPilot: ~/sky_workdir)
#   EXTRAS=serve GPU=optional bash cloud/setup.sh   # the project's [serve] extra; a machine without a GPU is fine
# Each step prints a timestamped line (`sky jobs logs` shows them as they come), a long install says
# every HEARTBEAT_S seconds how far it got, and a failure is one line naming the step and uv's last
# word (the whole output stays in $SETUP_LOG). It also writes when it started and ended
# ($SETUP_TIMES), which train.py reads to split a launch's time before it started (train.py: launch).
set -uo pipefail

PYTHON_VERSION=3.11  # the version the tests run on (setup.cfg's python_requires: the floor, checked by vermin)
venv="${VENV:-$HOME/venv}"
log="${SETUP_LOG:-$HOME/.dali-imagenet-setup.log}"
times="${SETUP_TIMES:-$HOME/.dali-imagenet-setup.json}"
heartbeat_s="${HEARTBEAT_S:-30}"
# Only a uv-managed Python (a python-build-standalone build, its headers included: inductor compiles
# against them) unless told otherwise: an image's own python3.11 may lack the headers and the venv module.
export UV_PYTHON_PREFERENCE="${UV_PYTHON_PREFERENCE:-only-managed}"
started=$(date +%s.%N)
: > "$log"

say() { echo "[setup $(date -u +%H:%M:%S)] $*"; }
fail() {  # one line: the step, uv's exit code and its last line of complaint
  local why
  why="$(grep -m1 -E '^error:' "$log")$(grep -E '^\s*(cause|Caused by):' "$log" | tail -n 1 | sed -E 's/^\s*/ (/; s/$/)/')"
  why=$(echo "$why" | cut -c1-400)
  echo "setup failed: $1${why:+: $why} (full log: $log)" >&2
  exit 1
}
# Runs a step's command with its output in the log and on the console, a line every heartbeat_s while it
# runs (an install of ~5 GB of wheels takes minutes and says little meanwhile).
run_step() {
  local what="$1" step_started=$SECONDS pid status
  shift
  say "$what"
  # (the sleep's output away from the pipe: a sleep outliving its killed loop would hold SkyPilot's log open)
  ( while sleep "$heartbeat_s" >/dev/null 2>&1; do
      say "  ... $what: $((SECONDS - step_started)) s so far, $(du -sh "$venv" 2>/dev/null | cut -f1) in $venv"
    done ) &
  pid=$!
  "$@" 2>&1 | tee -a "$log"
  status=${PIPESTATUS[0]}
  kill "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
  [ "$status" -eq 0 ] || fail "$what (exit $status)"
  say "  $what: done in $((SECONDS - step_started)) s"
}

uv="$(command -v uv || echo "$HOME/.local/bin/uv")"
[ -x "$uv" ] || { echo "setup failed: no uv on PATH or at ~/.local/bin/uv (SkyPilot installs it on every machine" \
                       "it starts; elsewhere: pip install uv)" >&2; exit 1; }
say "uv $("$uv" --version | cut -d' ' -f2) at $uv; the venv $venv on Python $PYTHON_VERSION" \
    "(python preference: $UV_PYTHON_PREFERENCE)"
run_step "the venv" "$uv" venv --clear --python "$PYTHON_VERSION" "$venv"
python="$venv/bin/python"

# ---- torch: the pinned build (cloud/torch-for-driver.sh below swaps it for one an older driver runs) ----
torch_pins=$(grep -E '^\s+torch(vision)?==' setup.cfg | tr -d ' ')
[ -n "$torch_pins" ] || fail "reading torch's pins from setup.cfg (none found)"
# shellcheck disable=SC2086  # one argument per pin
run_step "torch ($(echo $torch_pins))" "$uv" pip install --python "$python" $torch_pins
# ---- end of the torch install ----

run_step "the project and its other dependencies" "$uv" pip install --python "$python" -e ".${EXTRAS:+[$EXTRAS]}"
# The pinned torch wheel needs a recent NVIDIA driver (CUDA 13.0): print the driver / torch's CUDA /
# DALI's CUDA, and on an older driver install the same torch built for CUDA 12, or stop in one line.
# A task that may run without a GPU (cloud/serve.yaml's CPU replicas) sets GPU=optional.
if [ "${GPU:-required}" = optional ] && ! command -v nvidia-smi >/dev/null && [ ! -e /proc/driver/nvidia/version ]; then
  say "no NVIDIA driver here: the CPU (GPU=optional)"
else
  PATH="$(dirname "$uv"):$PATH" run_step "a torch this machine's driver runs" bash cloud/torch-for-driver.sh "$python"
fi
version=$("$python" -c 'import platform, torch; print(f"Python {platform.python_version()}, torch {torch.__version__}")' \
  2>>"$log") || fail "importing torch from $venv"
ended=$(date +%s.%N)
printf '{"started": %s, "ended": %s}\n' "$started" "$ended" > "$times"
say "ready: $venv ($version) in $(awk "BEGIN { printf \"%.0f\", $ended - $started }") s"
