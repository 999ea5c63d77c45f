"""Print the README's table: training memory by model at LoRA rank 8 and batch 4, float32, bfloat16 and 4-bit.

From each model's shape alone (gemma_mlx/sizing.py, the estimate `gemma-mlx run` checks before it
starts). The shapes are written here so the table needs no download: Gemma 3 270M and 1B from
docs/DESIGN.md, Gemma 3 4B's language model from its hub config, Gemma 4 E2B from mlx-lm's
gemma4_text defaults. Usage: python scripts/estimate_memory.py [--max-length 256]
"""

import argparse

from gemma_mlx.sizing import parameter_count, training_memory

GEMMA3 = dict(model_type="gemma3_text", vocab_size=262144, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
              sliding_window_pattern=6, tie_word_embeddings=True)
SHAPES = {
    "gemma-3-270m": {**GEMMA3, "hidden_size": 640, "num_hidden_layers": 18, "intermediate_size": 2048},
    "gemma-3-1b": {**GEMMA3, "hidden_size": 1152, "num_hidden_layers": 26, "intermediate_size": 6912},
    "gemma-3-4b (language model)": {**GEMMA3, "vocab_size": 262208, "hidden_size": 2560, "num_hidden_layers": 34,
                                    "intermediate_size": 10240, "num_attention_heads": 8, "num_key_value_heads": 4},
    "gemma-4-e2b": dict(model_type="gemma4_text", vocab_size=262144, vocab_size_per_layer_input=262144, hidden_size=1536,
                        num_hidden_layers=35, intermediate_size=6144, num_attention_heads=8, num_key_value_heads=1,
                        head_dim=256, global_head_dim=512, hidden_size_per_layer_input=256, num_kv_shared_layers=20,
                        use_double_wide_mlp=True, sliding_window_pattern=5, final_logit_softcapping=30.0,
                        tie_word_embeddings=True),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-length", type=int, default=256, help="tokens per example (half of them trained)")
    args = parser.parse_args()
    print("| model | parameters | float32 | bfloat16 | 4-bit (QLoRA) |")
    print("|---|---|---|---|---|")
    for name, shape in SHAPES.items():
        cells = []
        for dtype, bits in (("float32", None), ("bfloat16", None), ("bfloat16", 4)):
            memory = training_memory(shape, dtype=dtype, bits=bits, rank=8, batch=4, max_length=args.max_length,
                                     trained_per_example=args.max_length // 2)
            cells.append(f"{memory['total'] / 1e9:.1f} GB")
        print(f"| {name} | {parameter_count(shape)['total'] / 1e9:.2f} B | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
