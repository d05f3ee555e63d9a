"""The job worker: a Celery app (:mod:`worker.celery_app`), thin tasks (:mod:`worker.tasks`) and
the job logic they call (:mod:`worker.jobs`), testable without a broker.

Importing this package imports neither torch nor the settings: the Celery parent process stays
small and never initialises CUDA; the pipeline is imported inside the task, in the child.
"""
