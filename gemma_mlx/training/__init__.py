"""Helpers of `gemma-mlx train`: the loop, batching, the trainee (what learns, the loss) and the fast GELU."""
