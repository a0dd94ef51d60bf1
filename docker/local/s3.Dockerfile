# S3-compatible object store for the local stack, standing in for MinIO, which no registry reachable
# here provides (docker/local/README.md). moto's server speaks the S3 API over HTTP (the same server the
# test suite uses); production keeps MinIO. Versions from the project's requirements.txt (constraints).
ARG PYTHON_IMAGE=melanoma-local/python:3.11-bookworm
FROM ${PYTHON_IMAGE}

COPY requirements.txt /tmp/constraints.txt
RUN --mount=type=secret,id=build_ca \
    if [ -s /run/secrets/build_ca ]; then export PIP_CERT=/run/secrets/build_ca; fi \
    && pip install --no-cache-dir -c /tmp/constraints.txt "moto[server]" boto3 \
    && rm /tmp/constraints.txt \
    && useradd --create-home --uid 10002 s3
USER 10002
CMD ["moto_server", "-H", "127.0.0.1", "-p", "9000"]
