"""The service core that both the API (:mod:`api`) and the workers (:mod:`worker`) import.

- :mod:`mpq_service.settings`: the ``MPQ_*`` settings.
- :mod:`mpq_service.db`: engines and sessions; :mod:`mpq_service.migrate`: the migration runner.
- :mod:`mpq_service.tables`: the ORM tables; :mod:`mpq_service.job_status`: the job states.
- :mod:`mpq_service.storage`: storage backends; :mod:`mpq_service.storage_keys`: the one layout
  of object keys.
- :mod:`mpq_service.celery_config`: the task name, default queue and Celery configuration that
  the API (producer) and the workers (consumers) must agree on.

It imports neither :mod:`api` nor :mod:`worker`, and never torch (the contracts in
``pyproject.toml`` check this with import-linter).
"""
