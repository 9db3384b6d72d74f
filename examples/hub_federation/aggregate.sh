#!/usr/bin/env bash
# The aggregator of a federation through the Hugging Face Hub: publishes round 0, then each round.
#
#   HF_TOKEN=hf_... bash aggregate.sh REPO CLIENTS [more `peft-federated aggregate` options]
#   HF_TOKEN=hf_... bash aggregate.sh my-org/sentiment-fed hospital-a,hospital-b \
#       --client-repo hospital-a=hospital-a/sentiment-fed-updates
#
# Its token writes REPO and reads the clients' updates repos. Options given after CLIENTS override
# the settings below (the last occurrence of an option wins). Set HF_ENDPOINT for another Hub.
set -euo pipefail
REPO=${1:?usage: aggregate.sh REPO CLIENTS [options]}
CLIENTS=${2:?usage: aggregate.sh REPO CLIENTS [options]}
shift 2
exec peft-federated aggregate --repo "$REPO" --clients "$CLIENTS" \
    --model sentence-transformers/all-MiniLM-L6-v2 --num-labels 3 --task-type SEQ_CLS \
    --strategy fedex --rounds 10 --local-steps 10 --rank 8 --target-modules query,value \
    --deadline 1800 --poll-interval 30 "$@"
