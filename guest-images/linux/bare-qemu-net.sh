#!/usr/bin/env bash
# The baseline for the hypervisor's virtio-net: the two-VM network check on bare QEMU. Boots
# Debian's distro kernel (distro-kernel.sh) with the network initramfs (net-initramfs.sh) in two
# QEMU TCG instances at once, each with QEMU's own virtio-net-pci on a QEMU socket network (the
# server listens on 127.0.0.1:PORT, a free port, the client connects to it):
#   server  52:54:00:00:00:01  hv.ip=10.0.0.1/24 hv.net=server
#   client  52:54:00:00:00:02  hv.ip=10.0.0.2/24 hv.net=client hv.peer=10.0.0.1
# and checks their consoles: ping answered, the 10 MiB received with the size and sha256 sent,
# the page fetched over HTTP, both done. Takes the two host CPUs for a minute or two.
# Output on stdout, the client's transfer as the guest timed it (MB = 10^6 bytes):
#   HV-NET-TIME: <ms> ms
#   HV-NET-THROUGHPUT: <x.yy> MB/s
# Usage: guest-images/linux/bare-qemu-net.sh [--logs DIR]
#   --logs DIR  keeps the consoles as DIR/server.log and DIR/client.log (without it they are
#               kept, in a directory it names, only when a check fails)
# Exits non-zero when a check fails.
set -euo pipefail
SCRIPT_NAME=bare-qemu-net
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

LOGS=
case "${1:-}" in
    "") ;;
    --logs) { [ $# -eq 2 ] && [ -n "$2" ]; } || die "--logs needs a directory"; LOGS=$2 ;;
    -h | --help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
    *) die "unknown argument: $1 (usage: bare-qemu-net.sh [--logs DIR])" ;;
esac

ensure_packages qemu-system-x86
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing although qemu-system-x86 is installed"
use_distro_kernel
INITRD=$(bash "$LINUX_DIR/net-initramfs.sh" | tail -n1) || die "net-initramfs.sh failed"
[ -f "$INITRD" ] || die "net-initramfs.sh printed no archive path"

if [ -n "$LOGS" ]; then
    mkdir -p "$LOGS" || die "cannot create $LOGS"
    LOG_DIR=$(cd "$LOGS" && pwd)
else
    LOG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/bare-qemu-net.XXXXXX")
fi

# TCP ports in /proc/net/tcp{,6} are hex; state 0A is LISTEN.
port_used() { grep -q "^ *[0-9]*: [0-9A-F]*:$(printf '%04X' "$1") " /proc/net/tcp /proc/net/tcp6 2>/dev/null; }
port_listening() { grep -q "^ *[0-9]*: 0100007F:$(printf '%04X' "$1") 00000000:0000 0A " /proc/net/tcp; }
PORT=
for _ in 1 2 3 4 5 6 7 8 9 10; do
    candidate=$((20000 + RANDOM % 20000))
    port_used "$candidate" || { PORT=$candidate; break; }
done
[ -n "$PORT" ] || die "found no free TCP port"

# vm_command NAME MAC NETDEV APPEND: the QEMU command line of one VM, in VM_COMMAND.
vm_command() {
    VM_COMMAND=(timeout 300 qemu-system-x86_64 -accel tcg -cpu max -m 256 -nographic -no-reboot
        -kernel "$VMLINUZ" -initrd "$INITRD"
        -netdev "socket,id=n,$3" -device "virtio-net-pci,netdev=n,mac=$2"
        -append "console=ttyS0 panic=-1 $4")
    local word shown=()
    for word in "${VM_COMMAND[@]}"; do
        case $word in *[!A-Za-z0-9_./:=,+-]*) shown+=("'$word'") ;; *) shown+=("$word") ;; esac
    done
    say "$1: ${shown[*]} </dev/null >$LOG_DIR/$1.log"
}
SERVER_PID=
CLIENT_PID=
stop_vms() {
    local pid
    for pid in $SERVER_PID $CLIENT_PID; do kill "$pid" 2>/dev/null || true; done
}
trap stop_vms EXIT

vm_command server 52:54:00:00:00:01 "listen=127.0.0.1:$PORT" "hv.ip=10.0.0.1/24 hv.net=server"
"${VM_COMMAND[@]}" </dev/null >"$LOG_DIR/server.log" 2>&1 &
SERVER_PID=$!
# The client's QEMU connects as it starts: only once the server's listens.
tries=300
until port_listening "$PORT"; do
    kill -0 "$SERVER_PID" 2>/dev/null || die "the server's QEMU ended before listening on $PORT (see $LOG_DIR/server.log)"
    [ "$tries" -gt 0 ] || die "the server's QEMU does not listen on 127.0.0.1:$PORT"
    tries=$((tries - 1))
    sleep 0.1
done
vm_command client 52:54:00:00:00:02 "connect=127.0.0.1:$PORT" "hv.ip=10.0.0.2/24 hv.net=client hv.peer=10.0.0.1"
"${VM_COMMAND[@]}" </dev/null >"$LOG_DIR/client.log" 2>&1 &
CLIENT_PID=$!
say "booting the pair (consoles in $LOG_DIR)"
client_status=0
wait "$CLIENT_PID" || client_status=$?
# The server ends just after the client's HTTP fetch; after a client that failed, it would wait
# out its hv.wait.
tries=600
while kill -0 "$SERVER_PID" 2>/dev/null; do
    if [ "$tries" -le 0 ]; then
        say "the server still runs 60 s after the client ended: stopping it"
        kill "$SERVER_PID" 2>/dev/null || true
        break
    fi
    tries=$((tries - 1))
    sleep 0.1
done
server_status=0
wait "$SERVER_PID" || server_status=$?
SERVER_PID=
CLIENT_PID=

# marker LOG PREFIX: the rest of the first console line of LOG that starts with PREFIX.
marker() {
    awk -v prefix="$2 " '{ sub(/\r$/, "") } index($0, prefix) == 1 { print substr($0, length(prefix) + 1); exit }' "$1"
}
# line LOG LINE: LINE if it is a console line of LOG.
line() { awk -v want="$2" '{ sub(/\r$/, "") } $0 == want { print; exit }' "$1"; }
SERVER_LOG=$LOG_DIR/server.log
CLIENT_LOG=$LOG_DIR/client.log
failures=()
check() { # WHAT VALUE EXPECTED
    if [ "$2" = "$3" ]; then say "$1: $2"; else failures+=("$1: ${2:-none}, expected ${3:-something}"); fi
}
[ "$server_status" -eq 0 ] || failures+=("the server's QEMU exited with status $server_status")
[ "$client_status" -eq 0 ] || failures+=("the client's QEMU exited with status $client_status")
rtt=$(marker "$CLIENT_LOG" HV-NET-PING:)
check "client ping" "${rtt%% *}" ok
say "ping round trip: ${rtt#ok }"
tx=$(marker "$CLIENT_LOG" HV-NET-TX:)
check "bytes sent" "${tx%% *}" 10485760
check "bytes received and sha256" "$(marker "$SERVER_LOG" HV-NET-RX:)" "${tx:-sent}"
check "client's HTTP fetch" "$(marker "$CLIENT_LOG" HV-NET-HTTP:)" HV-NET-SERVICE-OK
check "server" "$(marker "$SERVER_LOG" HV-NET-MARKER:)" "up 10.0.0.1/24 52:54:00:00:00:01"
check "client" "$(marker "$CLIENT_LOG" HV-NET-MARKER:)" "up 10.0.0.2/24 52:54:00:00:00:02"
check "server end" "$(line "$SERVER_LOG" "HV-NET-MARKER: done")" "HV-NET-MARKER: done"
check "client end" "$(line "$CLIENT_LOG" "HV-NET-MARKER: done")" "HV-NET-MARKER: done"
time_ms=$(marker "$CLIENT_LOG" HV-NET-TIME:)
throughput=$(marker "$CLIENT_LOG" HV-NET-THROUGHPUT:)
[ -n "$time_ms" ] && [ -n "$throughput" ] || failures+=("the client reported no HV-NET-TIME or HV-NET-THROUGHPUT")
if [ ${#failures[@]} -gt 0 ]; then
    for failure in "${failures[@]}"; do say "FAILED: $failure"; done
    grep -a -h 'HV-NET-MARKER: \(failed\|server timed out\)' "$SERVER_LOG" "$CLIENT_LOG" | tr -d '\r' >&2 || true
    die "consoles kept in $LOG_DIR"
fi
[ -n "$LOGS" ] || rm -rf "$LOG_DIR"
echo "HV-NET-TIME: $time_ms"
echo "HV-NET-THROUGHPUT: $throughput"
