# The mpq service image. One image for every role of docker-compose.yml, which picks the command:
#   api      python -m uvicorn --factory api.app:create_app --host 0.0.0.0 --port 8000 (default)
#   worker   celery -A worker.celery_app worker --pool prefork --concurrency 1
#   migrate  python -m mpq_service.migrate upgrade
# Configuration is by MPQ_* environment variables only (mpq_service/settings.py); nothing secret
# is baked in (.dockerignore keeps .env, .git and local data out of the build context).
#
# torch is installed first, in its own layer, from TORCH_SPEC (a pip requirement):
#   docker build -t mpq .
#       torch from PyPI: on x86_64 Linux that wheel bundles CUDA, for the GPU workers.
#   docker build -t mpq --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#       the CPU-only wheel, a much smaller image (an API-only or CPU-worker deployment).
#   docker build -t mpq --build-arg TORCH_SPEC="torch==2.5.1" .
#       a pinned version (it must satisfy pyproject.toml's torch>=2.4,<3).
FROM python:3.11-slim

ARG TORCH_SPEC="torch>=2.4,<3"
ARG TORCH_INDEX_URL=""

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

RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"

COPY pyproject.toml README.md ./
COPY mpq_core ./mpq_core
COPY mpq_service ./mpq_service
COPY api ./api
COPY worker ./worker
COPY migrations ./migrations
# Editable, so mpq_service.migrate finds migrations/ beside the packages in /app; the torch
# installed above already satisfies the package's torch requirement and is kept.
RUN pip install -e ".[service]"

USER mpq
EXPOSE 8000

CMD ["python", "-m", "uvicorn", "--factory", "api.app:create_app", "--host", "0.0.0.0", "--port", "8000"]
