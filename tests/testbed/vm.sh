#!/usr/bin/env bash
# The cgroup v2 testbed flavour: the same debootstrapped bookworm rootfs as testbed.sh plus Debian's
# kernel and sshd, booted in a qemu VM. These build machines bind the cgroup controllers to v1
# hierarchies, so no nspawn machine can have the unified hierarchy real runner nodes use; a VM with
# its own kernel can. There is no usable hardware virtualization here: qemu runs under TCG (~30x
# slower than native; boot ≈ 40 s), so only a smoke subset of the e2e suite runs in it.
#
#   vm.sh host-packages  install what the host needs (qemu, ssh; .ci/run calls it)
#   vm.sh image          build the cached VM image if missing (keyed by the rootfs and this recipe)
#   vm.sh up             boot a throw-away overlay of the image, wait until running, import the image
#   vm.sh exec CMD...    run CMD inside (over ssh; argv is kept word for word)
#   vm.sh run CMD...     run CMD as a transient unit inside (systemd-run --wait --pipe)
#   vm.sh push F PATH    copy host file F to PATH inside the VM
#   vm.sh down           poweroff (kill after a grace period); remove the run dir
#
# The same verbs as testbed.sh, so tests/e2e (TESTBED_FLAVOUR=vm) and scripts/test drive both.
# `leader`/`root` do not apply: the VM shares no namespace and no filesystem with the host.
# Environment: TESTBED_DIR, TESTBED_NAME, TESTBED_CACHE as for testbed.sh (the VM's run state is
# $TESTBED_DIR/vm, beside the nspawn machine's $TESTBED_DIR/run, so both can be up at once);
# TESTBED_VM_MEM (MiB, default 3072), TESTBED_VM_CPUS (default 2), TESTBED_BTRFS_SIZE (default 4G),
# TESTBED_VM_BOOT_SECS (how long a boot may take, default 600).
# Inside, as in the nspawn machine: /srv/cocalc-projects is a btrfs disk, /xchg a directory for
# pushed files, podman has localhost/cocalc-project:latest; plus a 512 MiB swap disk (for the
# swap limit tests) and /sys/fs/cgroup is cgroup2.
# Network: user-mode (slirp) with restrict=on (the guest reaches nothing outside) and one port
# forward, 127.0.0.1:<free port> → guest sshd, for exec and push.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
DIR=${TESTBED_DIR:-/var/tmp/cocalc-testbed}
NAME=${TESTBED_NAME:-cocalc-tb}
RUN=$DIR/vm
CACHE_DIR=${TESTBED_CACHE:-$DIR}

log() { printf '[testbed-vm %(%T)T] %s\n' -1 "$*" >&2; }
die() { printf 'testbed-vm: %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (it builds a disk image from a chroot)"

host_packages() {
  local want=(qemu-system-x86_64:qemu-system-x86 qemu-img:qemu-utils ssh:openssh-client mkfs.ext4:e2fsprogs
              mkfs.btrfs:btrfs-progs python3:python3) w pass missing
  # two passes: bookworm's qemu-system-x86 removes a newer qemu-utils (e.g. from backports) it
  # conflicts with, and bookworm's qemu-utils comes back in the second
  for pass in 1 2; do
    missing=()
    for w in "${want[@]}"; do command -v "${w%%:*}" >/dev/null || missing+=("${w#*:}"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing host packages: ${missing[*]}"
    [ "$pass" = 2 ] || apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
      || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  done
  for w in "${want[@]}"; do command -v "${w%%:*}" >/dev/null || die "host package ${w#*:} did not install"; done
}

# The image recipe. Its own text is part of the cache key (see image_key): editing it rebuilds.
# $1: pristine rootfs (testbed.sh's cache), $2: output dir.
build_image_into() {
  local src=$1 out=$2 r=$2/root
  cp -a --reflink=auto "$src" "$r"
  # the nspawn rootfs masks sshd (its SSH benchmark runs one of its own); the VM is driven over it
  rm -f "$r/etc/systemd/system/ssh.service" "$r/etc/systemd/system/ssh.socket"
  # kernel + sshd, installed in a chroot inside a private mount namespace (the host is untouched)
  unshare -m --propagation private bash -c '
    set -e; r=$1
    mount -t proc proc "$r/proc"; mount --rbind /sys "$r/sys"; mount --rbind /dev "$r/dev"
    rm -f "$r/etc/resolv.conf"; cp -L /etc/resolv.conf "$r/etc/resolv.conf"
    chroot "$r" apt-get update -qq
    chroot "$r" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      linux-image-amd64 openssh-server
    chroot "$r" apt-get clean
    rm -f "$r/etc/resolv.conf"' _ "$r" >"$out/chroot.log" 2>&1 \
    || { tail -20 "$out/chroot.log" >&2; die "kernel install failed (log: $out/chroot.log)"; }
  echo "$NAME-vm" > "$r/etc/hostname"
  cat > "$r/etc/fstab" <<'EOF'
/dev/vda  /                     ext4  rw,relatime      0 1
/dev/vdb  /srv/cocalc-projects  btrfs defaults,nofail  0 0
/dev/vdc  none                  swap  sw,nofail        0 0
EOF
  mkdir -p "$r/srv/cocalc-projects" "$r/xchg"
  # the nspawn PID-1 wrapper's jobs (rw cgroup mounts, capped rlimits, loop nodes) are not needed
  # here: a real kernel, real root, udev. What the VM needs instead: DHCP for the slirp NIC and a
  # "booted" line on the serial console.
  printf '[Match]\nName=en* eth*\n[Network]\nDHCP=ipv4\n' > "$r/etc/systemd/network/10-slirp.network"
  ln -sf /lib/systemd/system/systemd-networkd.service "$r/etc/systemd/system/multi-user.target.wants/"
  cat > "$r/etc/systemd/system/testbed-booted.service" <<'EOF'
[Unit]
After=multi-user.target ssh.service
[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo TESTBED-BOOTED $(cut -d" " -f1 /proc/uptime) > /dev/ttyS0'
[Install]
WantedBy=multi-user.target
EOF
  ln -sf /etc/systemd/system/testbed-booted.service "$r/etc/systemd/system/multi-user.target.wants/"
  # boot-time work nobody here needs (each costs seconds under TCG)
  for u in e2scrub_reap.service e2scrub_all.timer fstrim.timer man-db.timer dpkg-db-backup.timer \
           systemd-networkd-wait-online.service serial-getty@ttyS0.service; do
    ln -sf /dev/null "$r/etc/systemd/system/$u"
  done
  mkdir -p -m700 "$r/root/.ssh"
  ssh-keygen -q -t ed25519 -N '' -C testbed -f "$out/id_ed25519"
  cp "$out/id_ed25519.pub" "$r/root/.ssh/authorized_keys"
  printf 'UseDNS no\nPasswordAuthentication no\nMaxSessions 64\nMaxStartups 64\n' > "$r/etc/ssh/sshd_config.d/testbed.conf"
  cp -L "$r/vmlinuz" "$out/vmlinuz"; cp -L "$r/initrd.img" "$out/initrd.img"
  truncate -s 6G "$out/disk.img"
  mkfs.ext4 -q -F -L testbed -d "$r" "$out/disk.img"
  rm -rf "$r"
}

rootfs() { "$HERE/testbed.sh" rootfs >&2; "$HERE/testbed.sh" rootfs-path; }

image_key() {   # the pristine rootfs (its own key is in its name) + this recipe's text
  { basename "$1"; declare -f build_image_into; } | sha256sum | cut -c1-12
}

image() {   # prints the image dir, building it if missing
  local src key img
  src=$(rootfs)
  key=$(image_key "$src")
  img=$CACHE_DIR/vm-$key
  if [ ! -f "$img/.complete" ]; then
    host_packages
    log "building the VM image $img from $src (kernel install: about 2 minutes)"
    local t0=$SECONDS
    rm -rf "$img.tmp"; mkdir -p "$img.tmp"
    build_image_into "$src" "$img.tmp"
    touch "$img.tmp/.complete"
    rm -rf "$img"; mv "$img.tmp" "$img"
    for d in "$CACHE_DIR"/vm-*; do [ "$d" = "$img" ] || rm -rf "$d"; done   # older recipes
    log "VM image ready in $((SECONDS - t0))s: $img ($(du -sh "$img" | cut -f1))"
  fi
  echo "$img"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

SSH_OPTS=(-o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR
  -o ConnectTimeout=30 -o ServerAliveInterval=15 -o ServerAliveCountMax=8)
ssh_vm() {
  [ -f "$RUN/port" ] || die "the VM is not up (no $RUN/port)"
  # one multiplexed connection: a new ssh handshake per command would cost ~1 s under TCG
  ssh "${SSH_OPTS[@]}" -i "$RUN/id_ed25519" -p "$(cat "$RUN/port")" \
    -o ControlMaster=auto -o ControlPath="$RUN/ssh.sock" -o ControlPersist=900 root@127.0.0.1 "$@"
}
# argv quoted word for word for the guest's shell, in the same clean environment as testbed.sh
ns() {
  ssh_vm "env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin TERM=dumb LANG=C.UTF-8 $(printf '%q ' "$@")"
}

up() {
  if [ -f "$RUN/qemu.pid" ] && kill -0 "$(cat "$RUN/qemu.pid")" 2>/dev/null; then
    die "the VM testbed $NAME is already up; run '$0 down' first"
  fi
  down >/dev/null 2>&1 || true
  local img t0 port
  host_packages
  img=$(image)
  t0=$SECONDS
  mkdir -p "$RUN"
  # a throw-away copy-on-write overlay: the cached image stays pristine
  qemu-img create -q -f qcow2 -F raw -b "$img/disk.img" "$RUN/disk.qcow2"
  truncate -s "${TESTBED_BTRFS_SIZE:-4G}" "$RUN/btrfs.img"; mkfs.btrfs -q -f "$RUN/btrfs.img" >/dev/null
  truncate -s 512M "$RUN/swap.img"; mkswap -q "$RUN/swap.img" >/dev/null 2>&1 || mkswap "$RUN/swap.img" >/dev/null
  install -m600 "$img/id_ed25519" "$RUN/id_ed25519"
  port=$(free_port); echo "$port" > "$RUN/port"
  log "booting $NAME (qemu TCG, ssh on 127.0.0.1:$port)"
  # KVM answers on these machines but the guest hangs or qemu aborts (shared/notes/testbed.md): TCG.
  setsid qemu-system-x86_64 -accel tcg,thread=multi -m "${TESTBED_VM_MEM:-3072}" -smp "${TESTBED_VM_CPUS:-2}" \
    -nodefaults -display none -monitor none -no-reboot \
    -kernel "$img/vmlinuz" -initrd "$img/initrd.img" \
    -append "root=/dev/vda rw console=ttyS0 quiet systemd.unified_cgroup_hierarchy=1 systemd.show_status=0" \
    -drive file="$RUN/disk.qcow2",if=virtio,format=qcow2,cache=unsafe \
    -drive file="$RUN/btrfs.img",if=virtio,format=raw,cache=unsafe \
    -drive file="$RUN/swap.img",if=virtio,format=raw,cache=unsafe \
    -netdev user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:"$port"-:22 -device virtio-net-pci,netdev=n0,romfile= \
    -serial file:"$RUN/serial.log" -pidfile "$RUN/qemu.pid" </dev/null >"$RUN/qemu.log" 2>&1 &
  local i deadline=$((SECONDS + ${TESTBED_VM_BOOT_SECS:-600}))   # ≈ 40 s idle, minutes on a busy host
  while [ $SECONDS -lt $deadline ]; do
    grep -q TESTBED-BOOTED "$RUN/serial.log" 2>/dev/null && break
    if [ -f "$RUN/qemu.pid" ] && ! kill -0 "$(cat "$RUN/qemu.pid")" 2>/dev/null; then
      cat "$RUN/qemu.log" >&2; tail -30 "$RUN/serial.log" >&2; die "qemu exited during boot"
    fi
    sleep 0.1
  done
  grep -q TESTBED-BOOTED "$RUN/serial.log" || { tail -30 "$RUN/serial.log" >&2; die "the VM did not boot in ${TESTBED_VM_BOOT_SECS:-600}s"; }
  local s=""
  for i in $(seq 60); do
    s=$(ns systemctl is-system-running --wait 2>/dev/null || true)
    case "$s" in running|degraded) break;; esac; sleep 1
  done
  case "$s" in
    running) ;;
    degraded) log "VM is degraded; failed units:"; ns systemctl --failed --no-legend >&2 || true ;;
    *) tail -30 "$RUN/serial.log" >&2; die "the VM did not reach running (state: ${s:-none})" ;;
  esac
  [ "$(ns stat -f -c %T /sys/fs/cgroup)" = cgroup2fs ] || die "/sys/fs/cgroup in the VM is not cgroup2"
  ns findmnt -n -o FSTYPE /srv/cocalc-projects | grep -qx btrfs || die "/srv/cocalc-projects is not the btrfs disk"
  # The package's default storage is a 20G sparse image in the state directory; the VM's root
  # disk is 6G, and storage-setup (rightly) refuses an image that could outgrow its filesystem.
  # A smaller image for this machine, in the vendor root (a purge of the package keeps it).
  ns sh -c 'mkdir -p /usr/lib/cocalc-project-host/config.d &&
    printf "[storage]\nimage_size = \"2G\"\n" > /usr/lib/cocalc-project-host/config.d/10-vm-testbed.toml'
  # the same project image as the nspawn machine (testbed.sh up)
  ns sh -c 'tar -C /var/lib/testbed-image -cf /var/tmp/testbed-image.tar . &&
    podman import -q -c "CMD [\"/bin/sh\",\"-c\",\"echo cocalc project \$COCALC_PROJECT_ID up as \$(id -un); exec httpd -f -p 8080 -h /home/user\"]" \
      /var/tmp/testbed-image.tar localhost/cocalc-project:latest && rm /var/tmp/testbed-image.tar' >/dev/null \
    || die "podman import of the testbed image failed"
  log "up: $NAME (VM, cgroup v2; guest booted in $(sed -n 's/.*TESTBED-BOOTED //p' "$RUN/serial.log" | tr -d '\r')s) in $((SECONDS - t0))s"
}

down() {
  if [ -f "$RUN/qemu.pid" ]; then
    local p; p=$(cat "$RUN/qemu.pid")
    if kill -0 "$p" 2>/dev/null; then
      # a clean poweroff is not needed (the overlay is thrown away) but lets units stop; bounded
      timeout 20 ssh "${SSH_OPTS[@]}" -i "$RUN/id_ed25519" -p "$(cat "$RUN/port")" -o ControlPath="$RUN/ssh.sock" \
        root@127.0.0.1 'systemctl poweroff --no-block' >/dev/null 2>&1 || true
      for _ in $(seq 300); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
      if kill -0 "$p" 2>/dev/null; then kill -TERM "$p" 2>/dev/null || true; sleep 1; fi
      if kill -0 "$p" 2>/dev/null; then kill -KILL "$p" 2>/dev/null || true; fi
    fi
  fi
  # the ssh control master (ControlPersist) for this VM
  [ -S "$RUN/ssh.sock" ] && ssh -o ControlPath="$RUN/ssh.sock" -O exit root@127.0.0.1 >/dev/null 2>&1 || true
  rm -rf "$RUN"
  echo "testbed VM $NAME is down"
}

case "${1:-}" in
  host-packages) host_packages ;;
  image) image ;;
  up) up ;;
  down) down ;;
  exec) shift; ns "$@" ;;
  run) shift; ns systemd-run --quiet --wait --pipe --collect --service-type=exec -- "$@" ;;
  push) [ $# -eq 3 ] || die "usage: $0 push HOST_FILE VM_PATH"
        ssh_vm "mkdir -p \"\$(dirname $(printf '%q' "$3"))\" && cat > $(printf '%q' "$3")" < "$2" ;;
  leader|root) die "'$1' does not apply to the VM flavour (no shared namespaces or filesystem)" ;;
  *) echo "usage: $0 image|up|exec CMD...|run CMD...|push FILE PATH|down" >&2; exit 2 ;;
esac
