"""The five stages, one module per notebook: what each stage computes and writes (`run_stage` and its steps)."""
