"""Helpers of `gemma-mlx compare`: its inputs, the scorecard, the judge and the report files."""
