"""fastlars microbenchmarks: one optimizer step on real models' parameter sets, side by side with the
optimizers a user would pick instead. `python -m benchmarks --help`; `pytest benchmarks/ --benchmark-only`."""
