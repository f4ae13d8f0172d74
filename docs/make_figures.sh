#!/usr/bin/env bash
# Regenerate the README's "What sam-probe shows" figures from the shipped sample runs.
# Each analysis is stored first, then drawn by `sam-probe report` (which names the stored settings in every
# caption and marks the late-SAM switch, the anchor and the reference checkpoint).
set -euo pipefail
cd "$(dirname "$0")/.."
R=$(mktemp -d)
trap 'rm -rf "$R"' EXIT
S=sample_runs
F=docs/figures
q="--out $R/store -q --no-plot"
sam-probe features $S/diag-small-gd $S/diag-small-sam $S/diag-medium-gd $S/diag-medium-sam $S/diag-large-gd $S/diag-large-sam $q
sam-probe sharpness $S/digits-mlp-sgd $S/digits-mlp-late-sam --top-k 1 $q
sam-probe distance $S/digits-mlp-sgd $S/digits-mlp-late-sam --ref 200 $q
sam-probe interpolate $S/digits-mlp-late-sam/step_000200.pt $S/digits-mlp-late-sam/step_000400.pt $q
sam-probe alignment $S/digits-mlp-sgd --vectors full,minibatch,sam,update $q
sam-probe ratios $S/digits-mlp-sgd $S/digits-mlp-sam $q
sam-probe overlap $S/digits-mlp-sgd $S/digits-mlp-sam $q
sam-probe subspace $S/digits-mlp-sgd $S/digits-mlp-sam --k 5 $q
sam-probe report $R/store -o $R/plots -f json > /dev/null
# report names each figure <figure>__<runs>__<id>.png (one settings group per figure here)
pick() { set -- "$R"/plots/"$1"__*.png; [ $# -eq 1 ] || { echo "expected one $1 figure, found $#" >&2; exit 1; }; echo "$1"; }
cp "$(pick features)" $F/minor_first_features.png
cp "$(pick sharpness)" $F/late_sam_sharpness.png
cp "$(pick distance)" $F/late_sam_distance.png
cp "$(pick interpolate)" $F/late_sam_interpolate.png
cp "$(pick alignment)" $F/alignment.png
cp "$(pick ratios_categories)" $F/ratios_categories.png
cp "$(pick overlap_C1)" $F/overlap_C1.png
cp "$(pick subspace)" $F/subspace.png
cp "$(pick subspace_overlap)" $F/subspace_overlap.png
chmod 0644 $F/*.png
echo "figures written to $F"
