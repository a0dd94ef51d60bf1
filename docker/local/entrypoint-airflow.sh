#!/usr/bin/env bash
# The official Airflow image's entrypoint contract: `bash ...` and `python ...` run as given, anything
# else is an Airflow command (`api-server`, `scheduler`, `airflow db migrate`, ...).
set -euo pipefail
case "${1:-}" in
    bash | python) exec "$@" ;;
    airflow) shift ;;
esac
exec airflow "$@"
