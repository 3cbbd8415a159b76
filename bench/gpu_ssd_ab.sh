#!/usr/bin/env bash
# A/B of this tree against an older version of some files, in one GPU call: bench/ssd.py at one length (kernel
# breakdown included) and bench/ssd_host_profile.py, alternating new / old / new / old so drift shows as spread.
# Usage (after bench/gpu_ssd.sh has installed mamba_ssm into /tmp/site):
#   bash bench/gpu_ssd_ab.sh OLD_FILES_DIR [LENGTH]
# OLD_FILES_DIR holds the old files at their repo-relative paths (e.g. .ab_old/cheems_parallel/kernels/ssd.py,
# made with `git show COMMIT:path`); it is an ignored folder, so name it in the device call's carry.
set -uo pipefail
OLD_FILES=${1:?old files dir}
LENGTH=${2:-4096}
# SKIP_MAMBA=--skip-mamba: our versions only, no mamba_ssm timings or kernel breakdown (session 16's four runs
# with them needed more than 200 s; not yet timed without)
SKIP_MAMBA=${SKIP_MAMBA:-}
OUT=${OUT:-/tmp/ab_out}
mkdir -p "$OUT"
OLD_TREE=/tmp/ab_old_tree
rm -rf "$OLD_TREE" && mkdir -p "$OLD_TREE" && cp -r cheems_parallel bench "$OLD_TREE"/ && cp -r "$OLD_FILES"/. "$OLD_TREE"/
for round in 1 2; do
  for side in new old; do
    tree=$PWD; [ "$side" = old ] && tree=$OLD_TREE
    echo "== $side (round $round)"
    (cd "$tree" && PYTHONPATH=/tmp/site:$tree python3 bench/ssd.py --lengths "$LENGTH" --no-sweep --skip-reference $SKIP_MAMBA \
       --out "$OUT/ab_${side}_${round}.json" 2>&1 | grep -E "^(mamba|cheems) |breakdown|^    [0-9]" | head -40)
    (cd "$tree" && PYTHONPATH=/tmp/site:$tree python3 bench/ssd_host_profile.py --top 0 2>&1 | grep "per call")
  done
done
