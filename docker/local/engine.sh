#!/usr/bin/env bash
# Installs and starts a Docker engine with the compose v2 plugin on a Debian bookworm machine, as root.
# Idempotent: what is there already is kept, a running engine is used as it is.
#   engine.sh        install what is missing, start dockerd unless one answers
#   engine.sh stop   stop the dockerd this script started (none other), e.g. after make test-stack
#
# - engine: Debian's docker.io (20.10), and debootstrap for the base images (base-images.sh).
#   The package cannot start its service on machines without systemd, so dockerd is started here,
#   with no default bridge and no iptables rules: every container of the local stack runs on the
#   host network (docker/local/compose.local.yaml), none on a container network.
# - compose v2 and buildx: bookworm packages only compose v1, so the plugins come from Debian's next
#   release (trixie) with apt itself, through a sources list of their own (the machine's apt setup is
#   left as it was), and are unpacked into /usr/local/lib/docker/cli-plugins.
set -euo pipefail

log() { printf 'engine: %s\n' "$*" >&2; }
PLUGINS=/usr/local/lib/docker/cli-plugins
DOCKERD_LOG=${DOCKERD_LOG:-/var/log/melanoma-dockerd.log}
DOCKERD_PID=/run/melanoma-dockerd.pid

if [ "$(id -u)" != 0 ]; then
    log "run as root (it installs packages and starts dockerd)"; exit 1
fi

install_debian_packages() {
    if command -v dockerd >/dev/null && command -v debootstrap >/dev/null && command -v docker >/dev/null; then
        return
    fi
    log "installing docker.io and debootstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        docker.io debootstrap ca-certificates >/dev/null
}

install_plugins() {
    if docker compose version 2>/dev/null | grep -q 'version v\?2' && docker buildx version >/dev/null 2>&1; then
        return
    fi
    log "installing the compose v2 and buildx plugins from Debian trixie"
    local work
    work=$(mktemp -d)
    mkdir -p "$work/lists/partial" "$work/archives/partial"
    cat > "$work/trixie.sources" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    local apt_opts=(-o "Dir::Etc::sourcelist=$work/trixie.sources" -o Dir::Etc::sourceparts=-
                    -o "Dir::State::Lists=$work/lists" -o "Dir::Cache::Archives=$work/archives"
                    -o APT::Sandbox::User=root)
    apt-get "${apt_opts[@]}" update -qq
    (cd "$work" && apt-get "${apt_opts[@]}" download docker-compose docker-buildx >/dev/null)
    mkdir -p "$PLUGINS"
    for deb in "$work"/*.deb; do
        dpkg-deb -x "$deb" "$work/root"
    done
    install -m 0755 "$work/root/usr/libexec/docker/cli-plugins/docker-compose" "$PLUGINS/docker-compose"
    install -m 0755 "$work/root/usr/libexec/docker/cli-plugins/docker-buildx" "$PLUGINS/docker-buildx"
    rm -rf "$work"
}

start_dockerd() {
    if docker info >/dev/null 2>&1; then
        return
    fi
    mkdir -p /etc/docker
    if [ ! -s /etc/docker/daemon.json ]; then
        # No docker0 bridge, no NAT rules: containers use the host network only.
        echo '{"bridge": "none", "iptables": false, "ip-masq": false, "storage-driver": "overlay2"}' \
            > /etc/docker/daemon.json
    elif ! grep -q '"bridge": *"none"' /etc/docker/daemon.json; then
        log "/etc/docker/daemon.json exists without \"bridge\": \"none\"; using it as it is"
    fi
    log "starting dockerd (log: $DOCKERD_LOG)"
    nohup dockerd >>"$DOCKERD_LOG" 2>&1 &
    echo $! > "$DOCKERD_PID"
    for _ in $(seq 1 60); do
        if docker info >/dev/null 2>&1; then
            return
        fi
        if ! kill -0 $! 2>/dev/null; then
            log "dockerd exited; the end of $DOCKERD_LOG:"; tail -n 20 "$DOCKERD_LOG" >&2; exit 1
        fi
        sleep 1
    done
    log "dockerd did not answer within 60 s; the end of $DOCKERD_LOG:"; tail -n 20 "$DOCKERD_LOG" >&2; exit 1
}

stop_dockerd() {
    local pid
    pid=$(cat "$DOCKERD_PID" 2>/dev/null) || { log "no dockerd started by this script; nothing to stop"; return; }
    rm -f "$DOCKERD_PID"
    kill -0 "$pid" 2>/dev/null || return 0
    log "stopping dockerd ($pid)"
    kill "$pid"
    for _ in $(seq 1 30); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 1
    done
    log "dockerd ($pid) did not stop within 30 s"; exit 1
}

if [ "${1:-}" = stop ]; then
    stop_dockerd
    exit 0
fi
install_debian_packages
install_plugins
start_dockerd
log "ready: $(docker version --format 'server {{.Server.Version}}, client {{.Client.Version}}'), $(docker compose version)"
