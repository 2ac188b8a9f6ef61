"""``python -m mlx_gpt`` lists the entry points."""

print("""mlx_gpt entry points:
  python -m mlx_gpt.train      train or fine-tune a model
  python -m mlx_gpt.generate   sample from a checkpoint
  python -m mlx_gpt.prepare    tokenize a corpus into data/
  python -m mlx_gpt.ladder     train and compare the language-model ladder
  python -m mlx_gpt.info       MLX version, device, BLAS and measured GFLOP/s
  python tools/convert.py      import/export GPT-2 checkpoints""")
