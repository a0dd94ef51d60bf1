#!/bin/sh
# Entrypoint of the training image.
#   docker run IMAGE train --processed-root ... -> python -m training train --processed-root ...
#   docker run IMAGE python -m training train ... (what the DAG's DockerOperator sends) -> run as given
#   docker run IMAGE sh                          -> a shell, for debugging
set -e
case "${1:-}" in
    python | python3 | python3.* | sh | bash | /*) exec "$@" ;;
    *) exec python -m training "$@" ;;
esac
