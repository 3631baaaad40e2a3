#!/usr/bin/env bash
# Prints the folder a cloud task stages its shards into: on the instance's local NVMe store when it
# has one (a g6.xlarge: 250 GB, several GB/s, wiped when a spot instance is reclaimed, so every new
# machine stages again): where it is mounted already (an image may mount it itself), else formatted and
# mounted at $LOCAL_NVME_MOUNT the first time; else on the
# root disk (train.py then stops in one line, before any download, if the shards do not fit).
set -euo pipefail
mount_point="${LOCAL_NVME_MOUNT:-/mnt/local-nvme}"
sys_block="${SYS_BLOCK:-/sys/block}"  # where the block devices are described (a test can point it elsewhere)
sudo_="${SUDO-$( [ "$(id -u)" = 0 ] || echo sudo )}"  # SUDO= runs the disk tools as they are

if mountpoint -q "$mount_point" 2>/dev/null; then
  echo "$mount_point/shards"
  exit 0
fi
for block in "$sys_block"/nvme*n1; do
  [ -e "$block" ] || continue
  # EBS volumes are NVMe too ("Amazon Elastic Block Store"); the instance store names itself
  grep -q "Instance Storage" "$block/device/model" 2>/dev/null || continue
  device="/dev/$(basename "$block")"
  # Mounted already, by the image (deep-learning AMIs: /opt/dlami/nvme) or an earlier start: use it where it is
  mounted_at=$(findmnt -rno TARGET -S "$device" 2>/dev/null | head -n 1 || true)
  if [ -n "$mounted_at" ]; then
    [ -w "$mounted_at" ] || { $sudo_ mkdir -p "$mounted_at/shards" && $sudo_ chown "$(id -u):$(id -g)" "$mounted_at/shards"; }
    echo "local NVMe $device already mounted at $mounted_at ($(df -h --output=size "$mounted_at" | tail -1 | tr -d ' ')):" \
         "staging there" >&2
    echo "$mounted_at/shards"
    exit 0
  fi
  $sudo_ blkid "$device" >/dev/null 2>&1 || $sudo_ mkfs.ext4 -q -F -E nodiscard "$device" >&2  # new: blank
  $sudo_ mkdir -p "$mount_point"
  $sudo_ mount -o noatime "$device" "$mount_point"
  $sudo_ chown "$(id -u):$(id -g)" "$mount_point"
  echo "local NVMe $device mounted at $mount_point ($(df -h --output=size "$mount_point" | tail -1 | tr -d ' '))" >&2
  echo "$mount_point/shards"
  exit 0
done
echo "no local NVMe instance store here: staging on the root disk ($(df -h --output=avail "$HOME" | tail -1 | tr -d ' ') free)" >&2
echo "$HOME/shards"
