#!/usr/bin/env bash
# Runs the paper-scale experiments on one GPU machine, several at once, each with --jobs
# runs side by side, and stops them after LIMIT seconds. Every finished run is checkpointed
# (results/<name>/runs.jsonl), so calling the script again with the same working tree
# finishes the missing runs (--resume) and then writes the reports.
#
#   bash results/run_gpu.sh LIMIT NAME:JOBS [NAME:JOBS ...]
#
# NAME: mnist, mnist-ablation, multimnist, pix2pix, pix2pix-ablation, srgan, cyclegan.
# The MNIST and Fashion-MNIST idx files and the feature classifiers' cache are read from
# $DATA (default runs/data; <data>/cache holds the classifiers, trained once beforehand so
# that every piece of an experiment measures FD-FMNIST with the same classifier).
set -u
limit=$1
shift
data=${DATA:-runs/data}
common=(--device cuda --data-dir "$data" --no-download --quiet --resume --threads 1)
mkdir -p results/logs
for item in "$@"; do
    name=${item%%:*}
    jobs=${item##*:}
    case $name in
        mnist) args=(mnist --seeds 10) ;;
        mnist-ablation) args=(mnist --ablation --seeds 10) ;;
        multimnist) args=(multimnist --seeds 3) ;;
        pix2pix) args=(pix2pix --seeds 3) ;;
        pix2pix-ablation) args=(pix2pix --ablation --seeds 3) ;;
        srgan) args=(srgan --seeds 3) ;;
        cyclegan) args=(cyclegan --seeds 3) ;;
        *) echo "unknown experiment $name" >&2; exit 2 ;;
    esac
    echo "$(date +%T) start $name (--jobs $jobs)"
    timeout -k 5 "$limit" python3 -m lossbalance "${args[@]}" --jobs "$jobs" "${common[@]}" \
        --out "results/$name" >>"results/logs/$name.log" 2>&1 &
done
wait
for item in "$@"; do
    name=${item%%:*}
    if [ -f "results/$name/runs.jsonl" ]; then
        echo "$(date +%T) $name: unfinished, $(wc -l <"results/$name/runs.jsonl") run(s) checkpointed"
    elif [ -f "results/$name/summary.json" ]; then
        echo "$(date +%T) $name: done"
    else
        echo "$(date +%T) $name: nothing yet; see results/logs/$name.log"
    fi
done
