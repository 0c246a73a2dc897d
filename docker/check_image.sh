#!/usr/bin/env bash
# Check a built lmk3d image on a machine where containers cannot run (docker/README.md, "Recorded build").
#
#   sudo docker/check_image.sh [IMAGE] [DICOM_SERIES_FOLDER]
#   (defaults: localhost/lmk3d:cpu and ../shared/data/dicom/mr_brain_sagittal_mprage)
#
# The image's files are run with chroot (podman create + podman mount; the container is never
# started), as the image's user, with the image's environment and working folder, in a private
# network and mount namespace that only this script's processes share. In there it plays the compose
# setup of docker/compose.yaml: Orthanc with docker/orthanc.json (this machine's Orthanc and DICOMweb
# plugin), the image's `lmk3d serve` with the compose command and environment, and nginx with
# docker/gateway/default.conf.template, the host names orthanc and lmk3d pointing at loopback. The
# gateway listens on 8080 here (lmk3d holds 8000 in the shared namespace), which is what compose does
# with LMK3D_PORT=8080. It then checks the image's Python stack, the health check, the server through
# the gateway (info, datastore, OHIF, the OHIF DICOMweb proxy against Orthanc's own answer, one
# inference on the uploaded series) and the security settings (token required past the gateway,
# foreign Host refused, foreign Origin refused).
#
# Needs root, podman, unshare, Orthanc with libOrthancDicomWeb.so, nginx, envsubst, curl, python3.
# Prints one "ok" line per check; exits non-zero at the first failure. Removes what it created.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(dirname "$HERE")"
IMAGE="${1:-localhost/lmk3d:cpu}"
SERIES="${2:-$REPO/../shared/data/dicom/mr_brain_sagittal_mprage}"
PLUGIN=/usr/share/orthanc/plugins/libOrthancDicomWeb.so
# Bounds on a hung start, not speed checks: the server loads its models in well under a minute.
READY_TIMEOUT_S="${READY_TIMEOUT_S:-600}"
INFER_TIMEOUT_S="${INFER_TIMEOUT_S:-600}"

die() { echo "check_image: FAILED: $*" >&2; exit 1; }
ok() { echo "ok   $*"; }

if [ "${1:-}" != "--inside" ]; then
  [ "$(id -u)" = 0 ] || die "run as root (chroot, mount and network namespaces)"
  for tool in podman unshare Orthanc nginx envsubst curl python3; do
    command -v "$tool" >/dev/null || die "$tool is not installed"
  done
  [ -e "$PLUGIN" ] || die "Orthanc's DICOMweb plugin $PLUGIN is missing (Debian: orthanc-dicomweb)"
  [ -d "$SERIES" ] || die "no DICOM series folder $SERIES"
  podman image exists "$IMAGE" || die "no image $IMAGE (podman images)"
  WORK="$(mktemp -d /tmp/lmk3d-check.XXXXXX)"
  CID="$(podman create "$IMAGE")"
  cleanup() {
    podman umount "$CID" >/dev/null 2>&1 || true
    podman rm -f "$CID" >/dev/null 2>&1 || true
    rm -rf "$WORK"
  }
  trap cleanup EXIT
  ROOTFS="$(podman mount "$CID")"
  # A private PID namespace too: whatever the check starts ends when it does.
  unshare --net --mount --pid --fork --mount-proc "$0" --inside "$IMAGE" "$SERIES" "$ROOTFS" "$WORK"
  exit $?
fi

# --- inside the private namespaces -----------------------------------------------------------------
IMAGE="$2" SERIES="$3" ROOTFS="$4" WORK="$5"
PIDS=()
stop_all() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  sleep 2
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  umount -l "$ROOTFS/proc" "$ROOTFS/dev" "$ROOTFS/tmp" 2>/dev/null || true
}
trap stop_all EXIT
mount --make-rprivate /
ip link set lo up

USER_NAME="$(podman image inspect --format '{{.Config.User}}' "$IMAGE")"
WORKDIR="$(podman image inspect --format '{{.Config.WorkingDir}}' "$IMAGE")"
mapfile -t IMAGE_ENV < <(podman image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$IMAGE" | sed '/^$/d')
USER_UID="$(awk -F: -v u="$USER_NAME" '$1 == u {print $3 ":" $4}' "$ROOTFS/etc/passwd")"
[ -n "$USER_UID" ] || die "image user $USER_NAME is not in the image's /etc/passwd"
[ "${USER_UID%%:*}" != 0 ] || die "the image runs as root"
ok "image user $USER_NAME ($USER_UID), working folder $WORKDIR"

mount -t proc proc "$ROOTFS/proc"
mount --rbind /dev "$ROOTFS/dev"
mount -t tmpfs -o mode=1777 tmpfs "$ROOTFS/tmp"
printf '127.0.0.1 localhost orthanc lmk3d\n::1 localhost\n' >"$ROOTFS/etc/hosts"
printf '127.0.0.1 localhost orthanc lmk3d\n::1 localhost\n' >"$WORK/hosts"
mount --bind "$WORK/hosts" /etc/hosts

# Run a command from the image as its user, with its environment (plus extra NAME=VALUE words).
in_image() {
  local extra=()
  while [ $# -gt 0 ] && [[ "$1" == *=* ]]; do extra+=("$1"); shift; done
  chroot --userspec="$USER_UID" "$ROOTFS" /usr/bin/env -i HOME="/home/$USER_NAME" "${IMAGE_ENV[@]}" "${extra[@]}" \
    /bin/sh -c 'cd "$0" && exec "$@"' "$WORKDIR" "$@"
}

# --- the image's stack ------------------------------------------------------------------------------
in_image lmk3d --help >"$WORK/help.txt" || die "lmk3d --help"
grep -q "serve" "$WORK/help.txt" || die "lmk3d --help lists no serve command"
ok "lmk3d --help"
in_image python -c "
import importlib.util, sys, torch, monai, monailabel, lmk3d
print(f'torch {torch.__version__} (cuda {torch.version.cuda}), monai {monai.__version__}, '
      f'monailabel {monailabel.__version__}, lmk3d {lmk3d.__version__}, '
      f'torchvision importable: {importlib.util.find_spec(\"torchvision\") is not None}')
" >"$WORK/versions.txt" || die "importing torch, monai, monailabel, lmk3d"
ok "$(cat "$WORK/versions.txt")"

# --- the compose setup ----------------------------------------------------------------------------
export LMK3D_PACS_USER=lmk3d
LMK3D_PACS_PASSWORD="$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')"
LMK3D_API_TOKEN="$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')"
LMK3D_ADMIN_TOKEN="$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')"
export LMK3D_PACS_PASSWORD LMK3D_API_TOKEN LMK3D_ADMIN_TOKEN
GATEWAY=http://127.0.0.1:8080

# Orthanc: docker/orthanc.json as the orthancteam image fills it in, with this machine's paths.
mkdir -p "$WORK/orthanc-db"
envsubst '${LMK3D_PACS_USER} ${LMK3D_PACS_PASSWORD}' <"$HERE/orthanc.json" | python3 -c "
import json, sys
config = json.load(sys.stdin)
config.update(StorageDirectory=sys.argv[1], IndexDirectory=sys.argv[1], Plugins=[sys.argv[2]])
json.dump(config, open(sys.argv[3], 'w'))
" "$WORK/orthanc-db" "$PLUGIN" "$WORK/orthanc.json"
Orthanc "$WORK/orthanc.json" >"$WORK/orthanc.log" 2>&1 &
PIDS+=($!); disown  # stopped by stop_all, without job notices
for _ in $(seq 1 120); do
  code="$(curl -s -o /dev/null -w '%{http_code}' -u "$LMK3D_PACS_USER:$LMK3D_PACS_PASSWORD" \
    http://127.0.0.1:8042/dicom-web/studies || true)"
  [ "$code" = 200 ] && break
  sleep 1
done
[ "$code" = 200 ] || die "Orthanc's DICOMweb did not answer (last $code); $(tail -5 "$WORK/orthanc.log")"
code="$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8042/dicom-web/studies)"
[ "$code" = 401 ] || die "Orthanc answered $code without credentials (401 expected)"
ok "Orthanc with docker/orthanc.json: DICOMweb up, credentials required"

n=0
for f in "$SERIES"/*; do
  python3 -c "import sys; sys.exit(0 if open(sys.argv[1], 'rb').read(132)[128:] == b'DICM' else 1)" "$f" || continue
  curl -sf -o /dev/null -u "$LMK3D_PACS_USER:$LMK3D_PACS_PASSWORD" -X POST --data-binary "@$f" \
    http://127.0.0.1:8042/instances || die "uploading $f to Orthanc"
  n=$((n + 1))
done
SERIES_UID="$(curl -sf -u "$LMK3D_PACS_USER:$LMK3D_PACS_PASSWORD" http://127.0.0.1:8042/dicom-web/series \
  | python3 -c "import json, sys; print(json.load(sys.stdin)[0]['0020000E']['Value'][0])")"
ok "uploaded $n instances of series $SERIES_UID"

# The server: the compose service's command and environment, run from the image as its user.
in_image LMK3D_PACS_USER="$LMK3D_PACS_USER" LMK3D_PACS_PASSWORD="$LMK3D_PACS_PASSWORD" \
  LMK3D_API_TOKEN="$LMK3D_API_TOKEN" LMK3D_ADMIN_TOKEN="$LMK3D_ADMIN_TOKEN" \
  lmk3d serve --studies http://orthanc:8042/dicom-web --workspace /workspace --host 0.0.0.0 --port 8000 \
  --cors-origin http://127.0.0.1:8080 --cors-origin http://localhost:8080 >"$WORK/server.log" 2>&1 &
PIDS+=($!); disown  # stopped by stop_all, without job notices

# The gateway: the template filled as the nginx image does (LMK3D_* only), listening on 8080.
mkdir -p "$WORK/nginx"
chmod 755 "$WORK" && chmod 777 "$WORK/nginx"  # nginx's workers run as nobody
envsubst '${LMK3D_API_TOKEN}' <"$HERE/gateway/default.conf.template" \
  | sed 's/listen 8000 default_server;/listen 8080 default_server;/' >"$WORK/nginx/gateway.conf"
grep -q "listen 8080" "$WORK/nginx/gateway.conf" || die "the gateway template has no 'listen 8000 default_server;'"
cat >"$WORK/nginx/nginx.conf" <<EOF
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log;
events {}
http {
  access_log $WORK/nginx/access.log;
  client_body_temp_path $WORK/nginx/body;
  proxy_temp_path $WORK/nginx/proxy;
  include $WORK/nginx/gateway.conf;
}
EOF
nginx -t -c "$WORK/nginx/nginx.conf" >"$WORK/nginx/test.log" 2>&1 || die "nginx -t: $(cat "$WORK/nginx/test.log")"
nginx -c "$WORK/nginx/nginx.conf" -g 'daemon off;' &
PIDS+=($!); disown  # stopped by stop_all, without job notices
ok "gateway config accepted by nginx ($(nginx -v 2>&1))"

start=$(date +%s)
until curl -sf -o "$WORK/info.json" "$GATEWAY/info/"; do
  [ $(( $(date +%s) - start )) -lt "$READY_TIMEOUT_S" ] || die "no /info/ after ${READY_TIMEOUT_S}s; $(tail -20 "$WORK/server.log")"
  kill -0 "${PIDS[1]}" 2>/dev/null || die "the server exited; $(tail -20 "$WORK/server.log")"
  sleep 2
done
ok "GET /info/ through the gateway after $(( $(date +%s) - start )) s: models $(python3 -c "
import json, sys; print(sorted(json.load(open(sys.argv[1]))['models']))" "$WORK/info.json")"

[ "$(podman image inspect --format '{{index .Config.Healthcheck.Test 0}}' "$IMAGE")" = CMD-SHELL ] \
  || die "the image has no HEALTHCHECK (podman build needs --format docker to keep it)"
in_image /bin/sh -c "$(podman image inspect --format '{{index .Config.Healthcheck.Test 1}}' "$IMAGE")" \
  || die "the image's HEALTHCHECK command failed"
ok "the image's HEALTHCHECK command passes"

code="$(curl -s -o "$WORK/datastore.json" -w '%{http_code}' "$GATEWAY/datastore/?output=all")"
[ "$code" = 200 ] && grep -q "$SERIES_UID" "$WORK/datastore.json" || die "datastore listing: $code $(head -c 300 "$WORK/datastore.json")"
ok "GET /datastore/ through the gateway (no token sent) lists the series"

code="$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8000/datastore/?output=all)"
[ "$code" = 401 ] || die "lmk3d itself answered $code without a token (401 expected)"
code="$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $LMK3D_API_TOKEN" http://127.0.0.1:8000/datastore/?output=all)"
[ "$code" = 200 ] || die "lmk3d itself answered $code with the token"
ok "past the gateway lmk3d requires the token (401 without, 200 with)"

curl -sf -o "$WORK/ohif.html" "$GATEWAY/ohif/" || die "GET /ohif/"
grep -qi "<html" "$WORK/ohif.html" || die "/ohif/ is not an HTML page"
curl -sf -u "$LMK3D_PACS_USER:$LMK3D_PACS_PASSWORD" -o "$WORK/studies.orthanc.json" http://127.0.0.1:8042/dicom-web/studies
curl -sf --compressed -o "$WORK/studies.proxy.json" "$GATEWAY/proxy/dicom/qido/studies" || die "GET /proxy/dicom/qido/studies"
python3 - "$WORK/studies.orthanc.json" "$WORK/studies.proxy.json" <<'EOF' || die "OHIF's DICOMweb proxy and Orthanc list different studies"
import json, sys
uids = [sorted(s["0020000D"]["Value"][0] for s in json.load(open(p))) for p in sys.argv[1:]]
sys.exit(0 if uids[0] == uids[1] and uids[0] else 1)
EOF
ok "GET /ohif/ and OHIF's /proxy/dicom/qido/studies through the gateway = Orthanc's own study list"

code="$(curl -s -o /dev/null -w '%{http_code}' -H 'Host: evil.example:8080' "$GATEWAY/info/")"
[ "$code" = 400 ] || die "the gateway answered $code to Host evil.example (400 expected)"
code="$(curl -s -o /dev/null -w '%{http_code}' -X POST -H 'Origin: http://evil.example' "$GATEWAY/infer/mean_shape?image=$SERIES_UID")"
[ "$code" = 403 ] || die "a foreign Origin got $code (403 expected)"
code="$(curl -s -o /dev/null -w '%{http_code}' -X POST -H "Origin: http://127.0.0.1:8080" \
  -F 'params={"result_write_to_file": false}' "$GATEWAY/infer/nosuchmodel?image=$SERIES_UID&output=json")"
[ "$code" != 403 ] || die "the gateway's own origin was refused (403)"
code="$(curl -s -o /dev/null -w '%{http_code}' -X PUT "$GATEWAY/model/mean_shape")"
[ "$code" = 401 ] || die "an admin route without the admin token got $code (401 expected)"
ok "foreign Host 400, foreign Origin 403, own origin passes, admin route without admin token 401"

# mean_shape (no network) and cascade (the torch networks) on the series the server downloads from Orthanc.
for model in ${INFER_MODELS:-mean_shape cascade}; do
  start=$(date +%s)
  code="$(curl -s -m "$INFER_TIMEOUT_S" -o "$WORK/infer.json" -w '%{http_code}' -X POST \
    -H "Origin: http://127.0.0.1:8080" -F 'params={"result_write_to_file": false}' \
    "$GATEWAY/infer/$model?image=$SERIES_UID&output=json")"
  [ "$code" = 200 ] || die "inference with $model answered $code: $(head -c 500 "$WORK/infer.json")"
  ok "POST /infer/$model on the PACS series through the gateway: 200 in $(( $(date +%s) - start )) s, $(python3 -c "
import json, sys
r = json.load(open(sys.argv[1]))
print(f\"{len(r.get('landmarks', r.get('points', [])) or [])} landmarks, stages {sorted(r.get('latencies', {}))}\")" "$WORK/infer.json")"
done
echo "check_image: all checks passed for $IMAGE"
