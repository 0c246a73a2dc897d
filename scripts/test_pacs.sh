#!/usr/bin/env bash
# A throw-away test PACS: Orthanc with DICOMweb, in a private network namespace.
#
#   LMK3D_PACS_USER=u LMK3D_PACS_PASSWORD=p scripts/test_pacs.sh start   # prints pid, url, netns
#   scripts/test_pacs.sh status
#   scripts/test_pacs.sh exec <command...>    # run a command inside the namespace (it sees the PACS)
#   scripts/test_pacs.sh stop
#
# Orthanc always binds 0.0.0.0, so it runs under `unshare --net` with only loopback up: nothing
# outside the namespace can reach it, and whatever talks to it must enter the namespace too
# (`exec` above, `nsenter --net=/proc/<pid>/ns/net`, or setns(2) as tests/test_pacs.py does).
# It is started with HTTP on port LMK3D_PACS_PORT (default 8042), the DICOMweb plugin at
# /dicom-web/, basic auth with LMK3D_PACS_USER / LMK3D_PACS_PASSWORD, remote access off and the
# DICOM port off. State (config, storage, log, pid) lives in LMK3D_PACS_DIR (default
# ${TMPDIR:-/tmp}/lmk3d-pacs); `stop` kills the recorded PID only. Needs root (CAP_SYS_ADMIN) for
# the namespace; exit status 3 means "cannot run here" (no unshare, no root, no Orthanc).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
DIR="${LMK3D_PACS_DIR:-${TMPDIR:-/tmp}/lmk3d-pacs}"
PORT="${LMK3D_PACS_PORT:-8042}"
PLUGIN=/usr/share/orthanc/plugins/libOrthancDicomWeb.so
PIDFILE="$DIR/orthanc.pid"
LOG="$DIR/orthanc.log"
# A bound on a hung start, not a speed check: Orthanc answers within seconds on an idle machine.
READY_TIMEOUT_S="${LMK3D_PACS_READY_TIMEOUT_S:-180}"

cannot() { echo "test_pacs: $*" >&2; exit 3; }
die() { echo "test_pacs: $*" >&2; exit 1; }

running_pid() {
  # The recorded PID, if that process is still our Orthanc (guards against PID reuse).
  [ -f "$PIDFILE" ] || return 1
  local pid
  pid="$(cat "$PIDFILE")"
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "Orthanc $DIR/orthanc.json" || return 1
  echo "$pid"
}

in_ns() {
  local pid="$1"; shift
  nsenter --net="/proc/$pid/ns/net" -- "$@"
}

dicomweb_status() {
  # HTTP status of a QIDO-RS query inside the namespace ("000" when nothing answers yet).
  in_ns "$1" curl -s -o /dev/null -w '%{http_code}' --max-time 10 \
    -u "$LMK3D_PACS_USER:$LMK3D_PACS_PASSWORD" "http://127.0.0.1:$PORT/dicom-web/studies" || true
}

json_string() {
  # A JSON string literal (credentials may hold quotes or backslashes).
  python3 -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$1"
}

start() {
  [ -n "${LMK3D_PACS_USER:-}" ] && [ -n "${LMK3D_PACS_PASSWORD:-}" ] \
    || die "set LMK3D_PACS_USER and LMK3D_PACS_PASSWORD (the basic-auth credentials of the test PACS)"
  if pid="$(running_pid)"; then
    echo "test_pacs: already running: pid=$pid url=http://127.0.0.1:$PORT/dicom-web netns=/proc/$pid/ns/net"
    return 0
  fi
  for tool in unshare nsenter ip curl python3; do
    command -v "$tool" >/dev/null 2>&1 || cannot "$tool is not installed"
  done
  if ! command -v Orthanc >/dev/null 2>&1 || [ ! -e "$PLUGIN" ]; then
    bash "$HERE/install_system_tools.sh" >&2 || true
    command -v Orthanc >/dev/null 2>&1 && [ -e "$PLUGIN" ] \
      || cannot "Orthanc with its DICOMweb plugin is not installed (Debian: orthanc orthanc-dicomweb; needs root)"
  fi
  unshare --net true 2>/dev/null || cannot "unshare --net does not work here (needs root / CAP_SYS_ADMIN)"

  mkdir -p "$DIR/db"
  chmod 700 "$DIR"
  local cfg="$DIR/orthanc.json"
  (umask 077 && cat >"$cfg" <<EOF
{
  "Name": "lmk3d-test-pacs",
  "StorageDirectory": "$DIR/db",
  "IndexDirectory": "$DIR/db",
  "Plugins": ["$PLUGIN"],
  "HttpServerEnabled": true,
  "HttpPort": $PORT,
  "HttpDescribeErrors": true,
  "RemoteAccessAllowed": false,
  "AuthenticationEnabled": true,
  "RegisteredUsers": { $(json_string "$LMK3D_PACS_USER"): $(json_string "$LMK3D_PACS_PASSWORD") },
  "DicomServerEnabled": false,
  "OrthancExplorerEnabled": false,
  "WebDavEnabled": false,
  "ConcurrentJobs": 1,
  "SaveJobs": false,
  "DicomWeb": {
    "Enable": true,
    "Root": "/dicom-web/",
    "EnableWado": false,
    "Host": "127.0.0.1:$PORT",
    "Ssl": false
  }
}
EOF
  )
  # unshare execs sh in the new namespace and sh execs Orthanc: one PID throughout, the one we record.
  setsid unshare --net sh -c "ip link set lo up && exec Orthanc \"\$0\"" "$cfg" >"$LOG" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$PIDFILE"
  local waited=0 code
  while :; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$PIDFILE"
      die "Orthanc exited during start-up; last lines of $LOG:
$(tail -n 20 "$LOG")"
    fi
    code="$(dicomweb_status "$pid")"
    case "$code" in
      200|204) break ;;
    esac
    if [ "$waited" -ge "$READY_TIMEOUT_S" ]; then
      stop_pid "$pid"
      die "DICOMweb did not answer within ${READY_TIMEOUT_S}s (last HTTP status $code); log: $LOG"
    fi
    sleep 1
    waited=$((waited + 1))
  done
  echo "test_pacs: running: pid=$pid url=http://127.0.0.1:$PORT/dicom-web netns=/proc/$pid/ns/net"
}

stop_pid() {
  local pid="$1" i
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$PIDFILE"
}

stop() {
  if pid="$(running_pid)"; then
    stop_pid "$pid"
    echo "test_pacs: stopped pid=$pid"
  else
    rm -f "$PIDFILE"
    echo "test_pacs: not running"
  fi
}

status() {
  if pid="$(running_pid)"; then
    echo "test_pacs: running: pid=$pid url=http://127.0.0.1:$PORT/dicom-web netns=/proc/$pid/ns/net"
  else
    echo "test_pacs: not running"
    return 1
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  exec)
    shift
    [ $# -gt 0 ] || die "usage: $0 exec <command...>"
    pid="$(running_pid)" || die "not running; start it first"
    in_ns "$pid" "$@"
    ;;
  *) die "usage: $0 start|stop|status|exec <command...>" ;;
esac
