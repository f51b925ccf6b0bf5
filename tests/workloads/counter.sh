#!/bin/sh
# Self-verifying counter for a busybox container: the running sum must
# always equal i*(i+1)/2, so lost or corrupted shell state after a restore
# shows as BAD.  Appends "<i> <sum> <ok|BAD>" to $1 (reopened every tick, so
# no file is held open across a checkpoint).
out=${1:-/data/progress}
i=0
acc=0
while true; do
    i=$((i + 1))
    acc=$((acc + i))
    if [ "$acc" -eq $((i * (i + 1) / 2)) ]; then s=ok; else s=BAD; fi
    echo "$i $acc $s" >> "$out"
    sleep 0.1
done
