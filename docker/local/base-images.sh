#!/usr/bin/env bash
# Builds local stand-ins for the public base images the stack uses, for a machine that reaches no image
# registry (docker/local/README.md). Idempotent: an image already tagged is kept (FORCE=1 rebuilds).
#
#   melanoma-local/debian:bookworm          debootstrap --variant=minbase bookworm, docker import
#   melanoma-local/python:3.11-bookworm     for python:3.11.x-slim-bookworm (docker/spark, docker/training)
#   melanoma-local/airflow:3.3.2-python3.11 for apache/airflow:3.3.2-python3.11 (docker/airflow)
#   melanoma-local/postgres:15-bookworm     for postgres (Debian's PostgreSQL 15, same env contract)
#   melanoma-local/s3:moto                  an S3-compatible server standing in for MinIO
#
# BUILD_CA_BUNDLE (default: the system bundle) is given to the builds as the secret `build_ca`: pip
# trusts it during the build (this machine reaches PyPI through a proxy that bundle trusts). It never
# enters an image.
set -euo pipefail
cd "$(dirname "$0")/../.."

log() { printf 'base-images: %s\n' "$*" >&2; }
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CA=${BUILD_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

have() { [ -z "${FORCE:-}" ] && docker image inspect "$1" >/dev/null 2>&1; }

debian_base() {
    local tag=melanoma-local/debian:bookworm rootfs
    have "$tag" && return
    log "debootstrap bookworm (minbase) -> $tag"
    rootfs=$(mktemp -d /var/tmp/melanoma-rootfs.XXXXXX)
    debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >/dev/null
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import --change 'CMD ["bash"]' --change 'ENV LANG=C.UTF-8' - "$tag" >/dev/null
    rm -rf "$rootfs"
}

# build <tag> <dockerfile in docker/local>: the context is docker/local plus requirements.txt (constraints).
build() {
    local tag=$1 dockerfile=$2 context
    have "$tag" && return
    log "building $tag"
    context=$(mktemp -d)
    cp docker/local/*.Dockerfile docker/local/*.sh requirements.txt "$context"/
    docker build --quiet --network host --secret "id=build_ca,src=$CA" \
        -t "$tag" -f "$context/$dockerfile" "$context" >/dev/null
    rm -rf "$context"
}

debian_base
build melanoma-local/python:3.11-bookworm python.Dockerfile
build melanoma-local/airflow:3.3.2-python3.11 airflow.Dockerfile
build melanoma-local/postgres:15-bookworm postgres.Dockerfile
build melanoma-local/s3:moto s3.Dockerfile
log "ready: $(docker images --format '{{.Repository}}:{{.Tag}} ({{.Size}})' 'melanoma-local/*' | tr '\n' ' ')"
