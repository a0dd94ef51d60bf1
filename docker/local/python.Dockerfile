# Local stand-in for the official `python:3.11.x-slim-bookworm` image, for machines that reach no image
# registry (docker/local/README.md). Debian bookworm's own Python 3.11, laid out as the official image is:
# a venv at /usr/local, so `python`, `python3` and `pip` are in /usr/local/bin and packages land in
# /usr/local/lib/python3.11/site-packages (the path docker/spark/Dockerfile sets SPARK_HOME under).
ARG DEBIAN_IMAGE=melanoma-local/debian:bookworm
FROM ${DEBIAN_IMAGE}

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && python3 -m venv /usr/local \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*

ENV LANG=C.UTF-8 \
    PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin
CMD ["python3"]
