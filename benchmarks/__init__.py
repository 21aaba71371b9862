"""Memory and throughput benchmarks of infonce_kernels against materialising baselines and peer
libraries. ``python -m benchmarks --help``; pytest-benchmark files: ``pytest benchmarks/``."""
