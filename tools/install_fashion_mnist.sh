#!/usr/bin/env bash
# Installs the embedded default dataset (Fashion-MNIST, Debian package dataset-fashion-mnist).
set -euo pipefail
dir=/usr/share/datasets/fashion-mnist
if [ -f "$dir/train-images-idx3-ubyte.gz" ]; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "Installing Fashion-MNIST (Debian package dataset-fashion-mnist) ..."
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
else
  cat >&2 <<MSG
Fashion-MNIST is not installed at $dir.
Install it with:   sudo apt-get install dataset-fashion-mnist
or download the four idx files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) into a folder and pass --data_path FOLDER.
MSG
  exit 1
fi
