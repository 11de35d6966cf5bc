#!/usr/bin/env bash
# Submit sharded preprocessing: a job array of N shards, then the merge of their manifests once every shard has
# succeeded (slurm/preprocess_array.sbatch says what each does). Run from the repository root:
#
#   slurm/preprocess.sh [--shards=N] [sbatch options] kinetics|ssv2 SRC DST [options of the preprocessing script]
#   slurm/preprocess.sh --shards=16 --partition=cpu --cpus-per-task=16 kinetics /raw/k400/train /data/k400/train
#
# N defaults to 8. The sbatch options (in the --name=value form) apply to both jobs and override the #SBATCH lines of
# preprocess_array.sbatch. Prints the two job ids, the array's then the merge's, one per line.
set -euo pipefail

die() { echo "preprocess.sh: $*" >&2; exit 2; }

shards=8
sbatch_options=()
while [[ ${1:-} == -* ]]; do
    case $1 in
        --shards=*) shards=${1#--shards=} ;;
        --*=*) sbatch_options+=("$1") ;;
        *) die "sbatch options go in the --name=value form, got '$1'" ;;
    esac
    shift
done
[[ $shards =~ ^[1-9][0-9]*$ ]] || die "--shards must be a positive integer, got '$shards'"
(($# >= 3)) || die "usage: $0 [--shards=N] [sbatch options] kinetics|ssv2 SRC DST [options]"

here=$(dirname "$0")
array=$(sbatch --parsable "${sbatch_options[@]}" --array="0-$((shards - 1))" "$here/preprocess_array.sbatch" "$@")
array=${array%%;*}  # "id;cluster" on a multi-cluster installation
# --kill-on-invalid-dep: a failed shard cancels the merge instead of leaving it pending for ever
merge=$(sbatch --parsable --job-name=kcenter-merge --output=slurm-%x-%j.out "${sbatch_options[@]}" \
    --dependency="afterok:$array" --kill-on-invalid-dep=yes "$here/preprocess_array.sbatch" "$@")
echo "$array"
echo "${merge%%;*}"
