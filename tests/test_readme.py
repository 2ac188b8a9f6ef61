"""Every command the README and the docs show still parses: its module exists and takes those flags.

A README that drifts from the code is the first thing a new user meets. Each command line in a
```bash block that runs one of ours (python -m mlx_gpt.X, mlx-gpt X, python tools/X.py) is fed
to that entry point's own argument parser, and stops there; the set-up and test commands are
what CI itself runs. The behaviour behind the flags is tested module by module.
"""

import argparse
import importlib
import importlib.util
import re
import shlex
import sys

import pytest

from conftest import ROOT


def readme_commands() -> list[str]:
    """The commands of README.md and of every page under docs/."""
    text = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
            if line:
                lines.append(line)
    return lines


def entry_point(words: list[str]) -> tuple[str, list[str]] | None:
    """(module name or tools/ path, argv) for a command of ours, else None."""
    if words[0] == "mlx.launch" and "--" in words:  # MLX's launcher runs the command after --
        words = words[words.index("--") + 1:]
    if words[:2] == ["python", "-m"] and words[2].startswith("mlx_gpt"):
        return ("mlx_gpt.__main__" if words[2] == "mlx_gpt" else words[2]), words[3:]
    if words[0] == "mlx-gpt":
        return "mlx_gpt.__main__", words[1:]
    if words[0] == "python" and words[1].startswith("tools/"):
        return words[1], words[2:]
    return None


def load(name: str):
    if not name.startswith("tools/"):
        return importlib.import_module(name)
    module_name = "readme_" + name[len("tools/"):-3]
    spec = importlib.util.spec_from_file_location(module_name, ROOT / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


COMMANDS = [c for c in readme_commands() if entry_point(shlex.split(c)) is not None]


class Parsed(Exception):
    pass


def test_the_readme_shows_commands_of_every_entry_point():
    shown = " ".join(COMMANDS)
    for name in ("mlx_gpt.train", "mlx_gpt.generate", "mlx_gpt.prepare", "mlx_gpt.ladder", "tools/convert.py",
                 "tools/bench.py"):
        assert name in shown, name


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses(command, monkeypatch):
    name, argv = entry_point(shlex.split(command))
    module = load(name)
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    if module.__name__ == "mlx_gpt.__main__":  # the dispatcher: check the command, then its flags
        name, argv = argv[0], argv[1:]
        assert name in module.available(), command
        module = importlib.import_module(f"mlx_gpt.{name}")
    with pytest.raises(Parsed):
        module.main(argv)


def python_blocks() -> dict[str, list[str]]:
    """page -> its ```python blocks, README.md's and every docs/ page's."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return {p.relative_to(ROOT).as_posix(): re.findall(r"```python\n(.*?)```", p.read_text(), flags=re.S)
            for p in pages}


# blocks that need what a test cannot have: GPT-2's weights, a server running
NOT_RUN = {"docs/converting.md": 1, "docs/serving.md": 1}


def test_python_examples_run_as_written(tmp_path):
    """The Python a newcomer copies runs as written, against the checkpoints it names (tiny ones)."""
    import os
    import subprocess

    from mlx_gpt import checkpoint
    from mlx_gpt.models.gpt import GPTConfig, build
    from mlx_gpt.tokenizer import ByteTokenizer

    model = build(GPTConfig(vocab_size=256, block_size=64, n_layer=1, n_head=2, n_embd=16), seed=0)
    for name in ("pydoc-byte-tiny", "run"):
        checkpoint.save(tmp_path / "checkpoints" / name, model, ByteTokenizer())
    ran = 0
    for page, blocks in python_blocks().items():
        if page in NOT_RUN:
            assert len(blocks) == NOT_RUN[page], f"{page}: a new block; run it here or say why not"
            continue
        for block in blocks:
            proc = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True,
                                  timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
            assert proc.returncode == 0, f"{page}:\n{block}\n{proc.stderr[-2000:]}"
            ran += 1
    assert ran >= 2
