"""The service core that both the API (:mod:`api`) and the workers (:mod:`worker`) import.

- :mod:`mpq_service.settings`: the ``MPQ_*`` settings.
- :mod:`mpq_service.db`: engines and sessions; :mod:`mpq_service.migrate`: the migration runner.
- :mod:`mpq_service.tables`: the ORM tables; :mod:`mpq_service.job_status`: the job states.
- :mod:`mpq_service.storage`: storage backends; :mod:`mpq_service.storage_keys`: the one layout
  of object keys.
- :mod:`mpq_service.celery_config`: the task name, default queue and Celery configuration that
  the API (producer) and the workers (consumers) must agree on.
- :mod:`mpq_service.job_public`: a job as clients see it (API answers, events, webhooks).
- :mod:`mpq_service.reaper` and :mod:`mpq_service.webhooks`: the background loops of every worker
  (:mod:`mpq_service.periodic`): orphaned jobs, and webhook calls (their URL rules in
  :mod:`mpq_service.webhook_targets`, their signature in :mod:`mpq_service.webhook_signature`,
  which receivers import too: it needs only the standard library).

It imports neither :mod:`api` nor :mod:`worker`, and never torch (the contracts in
``pyproject.toml`` check this with import-linter).
"""
