"""Tools around the pipeline: plan, gpu-check, params check, benchmarks, export, the run report."""
