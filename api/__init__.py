"""The REST API (FastAPI): routes, auth, upload streaming and sniffing. Never imports torch.

Settings, database, tables, storage and the task name come from :mod:`mpq_service`, which the
workers share; this package never imports :mod:`worker`.
"""
