"""Other projects' checkpoint files, read without their libraries and written back.

``tensors``: a tensor known by shape and dtype and read only when needed. ``safetensors_file``,
``torch_pickle`` and ``llmc`` read (and write) one file format each; ``hf`` and ``mlx_lm`` know
the directory layouts and GPT-2 names of Hugging Face transformers and mlx-lm. None of them
imports torch.
"""
