#!/usr/bin/env bash
# Start-up script for a Cloud TPU VM (one host):
#   gcloud compute tpus tpu-vm create jaxchat --zone=us-central2-b \
#     --accelerator-type=v4-8 --version=tpu-ubuntu2204-base \
#     --metadata-from-file=startup-script=infra/tpu-vm/startup.sh
# It installs jaxchat with TPU JAX and serves on port 8080 (bf16 on TPU by default).
set -euo pipefail
apt-get update -qq && apt-get install -y -qq git python3-venv make
if [ ! -d /opt/jaxchat ]; then
  git clone "${JAXCHAT_REPO:-https://github.com/jaxchat/jaxchat}" /opt/jaxchat
fi
cd /opt/jaxchat
make setup
.venv/bin/pip install --quiet "jax[tpu]"
export JAX_COMPILATION_CACHE_DIR=/var/cache/jaxchat/xla
nohup make serve PORT=8080 > /var/log/jaxchat.log 2>&1 &
