"""Helpers the tests (and the benchmarks) share: free ports, service processes started and
awaited, job polling, fresh Postgres databases, claimed Redis databases, a real S3 server.

Nothing here imports torch or the service packages, so any test or benchmark can use it.
"""
