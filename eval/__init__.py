"""eval: base against adapter on held-out data, benchmarks and lm-eval tasks (README.md, Evaluate)."""

import finetune  # noqa: F401  (first: its logging filters keep libraries' import-time notices off stderr)
