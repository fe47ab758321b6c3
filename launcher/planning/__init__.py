"""Planning, torch-free (only `--trace` loads torch): hardware, model specs, the estimator, step time, the search, the Plan."""
