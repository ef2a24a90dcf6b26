#!/bin/bash
# Read-back of cold data through the mount before and after `dase clean --recompress`
# (the logs and source parts, or PARTS), plus 4k random reads of one logs file
# when the logs are among them; three runs each.
# Usage: [DASE=path/to/dase] [CORPUS=/tmp/corpus] [PARTS="checkpoints"] [MOUNT_ARGS="--reference-cache 0"]
#        [RECOMPRESS=0] bash benches/corpus/readback.sh
# MOUNT_ARGS go to the mounts that read; RECOMPRESS=0 skips the pass and the reads after it.
# (root, FUSE; cargo build --release -p dase-tools first)
set -e
B=${DASE:-$(cd "$(dirname "$0")/../.." && pwd)/build/release/dase}
C=${CORPUS:-/tmp/corpus}
PARTS=${PARTS:-logs source}
MB=$(cd $C && du -sb $PARTS | awk '{s+=$1} END {print s/1e6}')
W=/tmp/rb; rm -rf $W; mkdir -p $W/mnt
$B cluster up --dir $W/c --dnodes 13 --size 1G > $W/up.log 2>&1 &
sleep 4
$B mkfs --cluster $W/c/cluster.toml > /dev/null
mnt() { $B mount --cluster $W/c/cluster.toml --log warn "$@" $W/mnt > $W/mount.log 2>&1 & sleep 3; }
cold() {
  for i in 1 2 3; do
    sync; echo 3 > /proc/sys/vm/drop_caches
    s=$(date +%s.%N); for p in $PARTS; do cat $W/mnt/$p/*; done > /dev/null; e=$(date +%s.%N)
    echo "$1 seq run $i: $(python3 -c "print(round($MB/($e-$s)))") MB/s"
  done
  case " $PARTS " in *" logs "*) ;; *) return ;; esac
  for i in 1 2 3; do
    sync; echo 3 > /proc/sys/vm/drop_caches
    $B bench --filename $W/mnt/logs/service-0.jsonl --rw randread --bs 4k --iodepth 4 --runtime 10 --log warn 2>&1 | grep -iE "iops|read:" | head -2 | sed "s/^/$1 rand run $i: /"
  done
}
mnt
for p in $PARTS; do cp -r $C/$p $W/mnt/; done
sync; umount $W/mnt; sleep 2
mnt $MOUNT_ARGS; cold before; umount $W/mnt; sleep 2
if [ "${RECOMPRESS:-1}" != 0 ]; then
( time $B clean --cluster $W/c/cluster.toml --recompress | tail -2 ) 2>&1 | grep -v "^$"
mnt $MOUNT_ARGS; cold after; umount $W/mnt; sleep 2
fi
$B stats --cluster $W/c/cluster.toml | sed -n '8,16p'
pkill -f "$W/c/" || true
