"""The benchmark scripts, a package so that they run as `python -m benchmarks.<script>` from the
repository root (benchmarks/README.md), with no sys.path edits."""
