"""The mpq service: REST API, persistence, storage and auth. Never imports torch."""
