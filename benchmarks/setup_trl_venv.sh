#!/usr/bin/env bash
# Creates benchmarks/.venv-trl: the TRL peer for `benchmarks/ppo_step.py --peer trl`.
#
# TRL removed its PPO trainer in 1.13.0, so the peer is pinned to trl==1.12.0 (`trl.experimental.ppo`).
# Its requirements (transformers>=4.56.2, accelerate>=1.4, datasets>=4.7) are met by our own venv, so
# this venv reuses our venv's packages (torch, transformers, peft, bitsandbytes: the same versions on
# both sides of the comparison) through a .pth file and adds only trl itself (--no-deps). Nothing is
# installed into our venv. Usage: bash benchmarks/setup_trl_venv.sh [path to our venv's python]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
base_python="${1:-$here/../.venv/bin/python}"
venv="$here/.venv-trl"
"$base_python" -m venv --without-pip "$venv" 2>/dev/null || "$base_python" -m venv "$venv"
site_base="$("$base_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
site_trl="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
mkdir -p "$site_trl"
echo "$site_base" > "$site_trl/_rlhf_base_venv.pth"  # our venv's packages, after trl's own
"$base_python" -m pip install --no-deps --target "$site_trl" "trl==1.12.0"
"$venv/bin/python" -c 'import trl, trl.experimental.ppo as p; print("trl", trl.__version__, "PPOTrainer:", p.PPOTrainer.__name__)'
