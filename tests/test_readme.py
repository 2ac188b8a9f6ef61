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
