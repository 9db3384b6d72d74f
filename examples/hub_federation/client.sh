#!/usr/bin/env bash
# One client of a federation through the Hugging Face Hub, on its own machine and its own data.
#
#   HF_TOKEN=hf_... bash client.sh REPO CLIENT_ID DATA [more `peft-federated client` options]
#   HF_TOKEN=hf_... bash client.sh my-org/sentiment-fed hospital-a train.csv \
#       --update-repo hospital-a/sentiment-fed-updates
#
# DATA: a CSV/JSON(L) file with `text` and `label` columns, or a `save_to_disk` folder. The
# federation's settings come from its round 0. Its token reads REPO and writes its updates repo
# (default <REPO>-updates-<CLIENT_ID>). Set HF_ENDPOINT for another Hub.
set -euo pipefail
REPO=${1:?usage: client.sh REPO CLIENT_ID DATA [options]}
CLIENT_ID=${2:?usage: client.sh REPO CLIENT_ID DATA [options]}
DATA=${3:?usage: client.sh REPO CLIENT_ID DATA [options]}
shift 3
exec peft-federated client --repo "$REPO" --client-id "$CLIENT_ID" --data "$DATA" --num-labels 3 \
    --max-length 64 --batch-size 16 --lr 3e-3 --poll-interval 30 "$@"
