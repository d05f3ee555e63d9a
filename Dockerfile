# The mpq images: one Dockerfile, two targets, both built by docker-compose.yml.
#
#   api      the REST API and the one-shot migration (and `mpq keys ...`): the service's
#            libraries and the three core dependencies the API imports (numpy, scipy,
#            google-re2), listed by deploy/api_requirements.py from pyproject.toml; the package
#            itself is installed with --no-deps, so torch is never installed (the API process
#            never imports it; tests/test_deploy_files.py runs the API with only these packages).
#   worker   the Celery worker: the whole package with torch. torch's Linux x86_64 wheel carries
#            CUDA's user-space libraries, so this image runs jobs on a GPU wherever the NVIDIA
#            container toolkit provides the driver (docker-compose.yml reserves one GPU for each
#            worker), and on the CPU elsewhere.
#
# Every pip install is constrained by constraints.txt (the versions CI tests).
#   docker build --target api -t mpq-api:0.1.0 .
#   docker build --target worker -t mpq-worker:0.1.0 .
#   docker build --target worker -t mpq-worker-cpu:0.1.0 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#       a much smaller worker image with the CPU-only torch wheel, for CPU-only machines.
# Configuration is by MPQ_* environment variables only (mpq_service/settings.py); nothing secret
# is baked in (.dockerignore keeps .env, .git and local data out of the build context).

# An exact Python release on an exact Debian release (bump both on purpose, never implicitly).
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPQ_DATA_DIR=/var/lib/mpq

# An unprivileged user owning only the scratch/data folder; the code stays root-owned.
RUN useradd --system --uid 10001 --create-home --home-dir /home/mpq mpq \
    && mkdir -p /var/lib/mpq \
    && chown mpq:mpq /var/lib/mpq

WORKDIR /app
COPY constraints.txt pyproject.toml README.md ./
COPY deploy ./deploy


FROM base AS api

# The dependencies first, in their own layer: rebuilt only when pyproject.toml changes.
RUN python deploy/api_requirements.py pyproject.toml > /tmp/api-requirements.txt \
    && pip install -c constraints.txt -r /tmp/api-requirements.txt

COPY mpq_core ./mpq_core
COPY mpq_service ./mpq_service
COPY api ./api
COPY migrations ./migrations
# Editable, so mpq_service.migrate finds migrations/ beside the packages in /app; --no-deps
# keeps torch (a core dependency) out.
RUN pip install -c constraints.txt --no-deps -e .

USER mpq
EXPOSE 8000

CMD ["mpq", "serve", "--no-worker", "--host", "0.0.0.0", "--port", "8000"]


FROM base AS worker

# Empty: torch from PyPI (its CUDA build); the CPU-only index for a CPU worker image.
ARG TORCH_INDEX_URL=""
# What the NVIDIA container toolkit mounts into the container: the CUDA driver, nvidia-smi.
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility

# torch first, in its own layer (gigabytes): rebuilt only when constraints.txt changes.
RUN pip install -c constraints.txt ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch

COPY mpq_core ./mpq_core
COPY mpq_service ./mpq_service
COPY worker ./worker
COPY migrations ./migrations
# The torch installed above satisfies the package's torch requirement and is kept.
RUN pip install -c constraints.txt -e ".[service]"

USER mpq

CMD ["celery", "-A", "worker.celery_app", "worker", "--pool", "prefork", "--concurrency", "1", "--loglevel", "INFO"]
