# Local stand-in for the official `apache/airflow:3.3.2-python3.11` image (docker/local/README.md): what
# docker/airflow/Dockerfile and docker-compose.yaml rely on. User `airflow` (uid 50000, group 0) owns the
# Python packages so that its `pip install` works as in the official image, AIRFLOW_HOME=/opt/airflow,
# `/entrypoint` runs `airflow <command>` (or bash/python), curl for the healthchecks, and the Postgres
# driver. Versions come from the project's requirements.txt (a constraints file), so they match the venv.
ARG PYTHON_IMAGE=melanoma-local/python:3.11-bookworm
FROM ${PYTHON_IMAGE}

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*

COPY requirements.txt /tmp/constraints.txt
# The CA bundle is an optional build secret (a company proxy's CA, say): used by pip here, never stored.
# In the same layer as the install, so the image holds the packages once.
RUN --mount=type=secret,id=build_ca \
    if [ -s /run/secrets/build_ca ]; then export PIP_CERT=/run/secrets/build_ca; fi \
    && pip install --no-cache-dir -c /tmp/constraints.txt \
        apache-airflow==3.3.2 apache-airflow-providers-postgres psycopg2-binary \
    && rm /tmp/constraints.txt \
    && useradd --create-home --uid 50000 --gid 0 --home-dir /home/airflow airflow \
    && mkdir -p /opt/airflow \
    && chown -R airflow:0 /opt/airflow /usr/local

COPY entrypoint-airflow.sh /entrypoint
RUN chmod 0755 /entrypoint

ENV AIRFLOW_HOME=/opt/airflow \
    AIRFLOW_USER_HOME_DIR=/home/airflow
USER 50000
WORKDIR /opt/airflow
ENTRYPOINT ["/entrypoint"]
CMD []
