"""Regenerate every benchmark result under bench/results/ (``make bench``)."""

from __future__ import annotations

from bench import (
    bench_allocation,
    bench_api,
    bench_archive_guard,
    bench_contraction,
    bench_curve,
    bench_deploy,
    bench_fisher_memory,
    bench_pipeline,
    bench_sandbox,
    bench_sensitivity,
    bench_zoo,
    hostile_corpus,
)


def main() -> None:
    bench_sensitivity.main([])
    bench_allocation.main()
    bench_pipeline.main([])
    bench_api.main([])
    bench_zoo.main([])
    bench_sandbox.main([])
    bench_archive_guard.main()
    hostile_corpus.main()
    bench_fisher_memory.main()
    bench_contraction.main()
    bench_deploy.main([])
    bench_curve.main([])


if __name__ == "__main__":
    main()
