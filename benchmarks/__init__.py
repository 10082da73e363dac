"""nanoblock's benchmarks (run from the repository root): bench_block,
bench_ops, bench_train, and run_all for the whole suite; see README.md here."""
