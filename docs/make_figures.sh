#!/usr/bin/env bash
# Regenerate the README's "What sam-probe shows" figures from the shipped sample runs.
set -euo pipefail
cd "$(dirname "$0")/.."
R=$(mktemp -d)
S=sample_runs
sam-probe features $S/diag-small-gd $S/diag-small-sam $S/diag-medium-gd $S/diag-medium-sam $S/diag-large-gd $S/diag-large-sam --out $R/f -q
cp $R/f/plots/features.png docs/figures/minor_first_features.png
sam-probe sharpness $S/digits-mlp-sgd $S/digits-mlp-late-sam --top-k 1 --out $R/l -q
sam-probe distance $S/digits-mlp-sgd $S/digits-mlp-late-sam --ref 200 --out $R/l -q
sam-probe interpolate $S/digits-mlp-late-sam/step_000200.pt $S/digits-mlp-late-sam/step_000400.pt --out $R/l -q
cp $R/l/plots/sharpness.png docs/figures/late_sam_sharpness.png
cp $R/l/plots/distance.png docs/figures/late_sam_distance.png
cp $R/l/plots/interpolate.png docs/figures/late_sam_interpolate.png
sam-probe alignment $S/digits-mlp-sgd --vectors full,minibatch,sam,update --out $R/a -q
cp $R/a/plots/alignment.png docs/figures/alignment.png
sam-probe ratios $S/digits-mlp-sgd $S/digits-mlp-sam --out $R/r -q
sam-probe overlap $S/digits-mlp-sgd $S/digits-mlp-sam --out $R/r -q
cp $R/r/plots/ratios_categories.png docs/figures/ratios_categories.png
cp $R/r/plots/overlap_C1.png docs/figures/overlap_C1.png
rm -rf "$R"
echo "figures written to docs/figures"
