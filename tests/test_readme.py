"""Every command the README and the docs show still parses: its module exists and takes those flags.

A README that drifts from the code is the first thing a new user meets. Each command line in a
```bash block that runs one of ours (python -m mlx_gpt.X, mlx-gpt X, python tools/X.py) is fed
to that entry point's own argument parser, and stops there; the set-up and test commands are
what CI itself runs. The behaviour behind the flags is tested module by module.
"""

import argparse
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, ROOT


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
    from mlx_gpt import checkpoint
    from mlx_gpt.models.gpt import GPTConfig, build
    from mlx_gpt.tokenizer import ByteTokenizer

    model = build(GPTConfig(vocab_size=256, block_size=64, n_layer=1, n_head=2, n_embd=16), seed=0)
    for name in ("pydoc-byte-modern-tiny", "run"):
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


# ---------------------------------------------------------------------------- the shell examples, run

# commands shown but not run here, each with why (a new command fails the test until it is run or listed)
SHELL_NOT_RUN = {
    'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[cpu,dev]"': "the set-up CI itself runs",
    "python -m pytest -q": "the test command CI itself runs",
    'pip install -e ".[cpu,serve]"': "an install, which the set-up above covers",
    "mlx.launch --hosts mac1,mac2 -- python -m mlx_gpt.train --data shakespeare": "needs two Macs",
    "mlx.launch --hostfile hosts.json -- python -m mlx_gpt.train --data shakespeare": "needs the hosts it names",
    "mlx.launch -n 4 --backend nccl -- python -m mlx_gpt.train --data shakespeare": "needs four NVIDIA GPUs",
    "python tools/bench.py": "a benchmark of an hour; tests/test_bench.py runs its parts at tiny sizes",
    "python tools/bench.py --vs-torch --json bench.json": "a benchmark of hours, against other tools",
    "python tools/bench.py --vs-torch --configs A,decode --rounds 2": "a benchmark of many minutes",
    "python tools/bench_distributed.py": "GPT-2 124M in two processes: a benchmark of many minutes",
}

# what makes a command tiny: flags appended to it (later flags win), by entry point
SHRINK = {
    "mlx_gpt.train": ["--max-iters", "2", "--eval-interval", "2", "--eval-iters", "1", "--batch-size", "2",
                      "--grad-accum", "1"],
    "mlx_gpt.generate": ["--max-new-tokens", "8"],
    "mlx_gpt.ladder": ["--batch-sizes", "4", "--lr-scales", "1", "--sample-tokens", "8"],
    "tools/bench_prepare.py": ["--mb", "1", "--repeat", "1"],
}


def shell_pages() -> list[tuple[str, list[str]]]:
    """(page, its shell commands) in a newcomer's order: the README first, then docs/ pages."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    out = []
    for p in pages:
        lines = []
        for block in re.findall(r"```bash\n(.*?)```", p.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
                if line:
                    lines.append(" ".join(line.split()))
        out.append((p.relative_to(ROOT).as_posix(), lines))
    return out


def newcomer_workspace(root: Path) -> None:
    """What a newcomer's commands read and this machine cannot download: tiny stand-ins at the
    paths the docs name (GPT-2 as Hugging Face and llm.c save it, a few text files, HellaSwag's
    format, llm.c's token files), the repository's tools/ and configs/, and a trained run."""
    from test_llmc import _llmc_file, _params

    from mlx_gpt import checkpoint, data
    from mlx_gpt.formats import llmc
    from mlx_gpt.gpt2_tokenizer import GPT2Tokenizer
    from mlx_gpt.models.gpt import GPTConfig, build
    from mlx_gpt.tokenizer import ByteTokenizer

    for name in ("tools", "configs"):
        (root / name).symlink_to(ROOT / name)
    (root / "data" / "downloads").mkdir(parents=True)
    shutil.copy(DATA / "tinyshakespeare.txt", root / "data" / "downloads" / "tinyshakespeare.txt")
    verdict = (DATA / "the-verdict.txt").read_text()
    (root / "my_notes").mkdir()
    (root / "my_notes" / "a.txt").write_text(verdict[: len(verdict) // 2])
    (root / "my_notes" / "b.txt").write_text(verdict[len(verdict) // 2:])
    (root / "my.txt").write_text(verdict)
    corpora(root)
    cfg = GPTConfig(vocab_size=50257, block_size=256, n_layer=1, n_head=2, n_embd=64)
    params = _params(cfg)
    _llmc_file(root / "gpt2_124M.bin", cfg, params)
    _llmc_file(root / "gpt2_124M_bf16.bin", cfg, params, version=5)
    llmc.write_tokenizer(root / "gpt2_tokenizer.bin", GPT2Tokenizer.from_directory(DATA / "gpt2"))
    shutil.copytree(DATA / "gpt2", root / "data" / "tokenizers" / "gpt2")  # where training.md puts them
    for where, names in (("path/to/gpt2", ("encoder.json", "vocab.bpe")), ("path/to/hf-gpt2", ("vocab.json", "merges.txt"))):
        d = root / where
        d.mkdir(parents=True)
        for src, dst in zip(("encoder.json", "vocab.bpe"), names):
            shutil.copy(DATA / "gpt2" / src, d / dst)
        write_hf_gpt2(d, cfg, params)
    tokens = np.random.default_rng(0).integers(0, 50256, 5000, dtype=np.uint16)
    (root / "data" / "fineweb10B").mkdir()
    for shard in ("val_000000", "train_000001"):  # as llm.c's fineweb.py names them
        data.write_tokens(root / "data" / "fineweb10B" / f"fineweb_{shard}.bin", tokens, 50257)
    questions = [{"ind": i, "ctx": "The cat sat on the", "endings": ["mat.", "sky.", "moon.", "sea."], "label": 0,
                  "split": "val"} for i in range(4)]
    (root / "hellaswag_val.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    model = build(GPTConfig(vocab_size=256, block_size=64, n_layer=1, n_head=2, n_embd=64), seed=0)
    checkpoint.save(root / "checkpoints" / "run", model, ByteTokenizer())  # wide enough to quantize


def corpora(root: Path) -> None:
    """The corpora docs/data.md names, small: a folder of books, a zstd-compressed jsonl dump with
    its text under "content", a FineWeb-like folder of Parquet files, and a corpus in four parts."""
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    zstd = pytest.importorskip("zstandard")
    plays = (DATA / "tinyshakespeare.txt").read_text().split("\n\n")
    documents = ["\n\n".join(plays[i:i + 40]) for i in range(0, len(plays), 40)]
    for i, doc in enumerate(documents[:24]):
        shelf = root / "books" / f"shelf{i % 3}"
        shelf.mkdir(parents=True, exist_ok=True)
        (shelf / f"book{i}.txt").write_text(doc)
    lines = "".join(json.dumps({"id": i, "content": d}) + "\n" for i, d in enumerate(documents))
    (root / "dump.jsonl.zst").write_bytes(zstd.ZstdCompressor().compress(lines.encode()))
    (root / "fineweb" / "sample").mkdir(parents=True)
    for k in range(2):
        part = documents[k::2]
        pq.write_table(pa.table({"text": part, "id": [str(i) for i in range(len(part))]}),
                       root / "fineweb" / "sample" / f"00{k}_00000.parquet")
    (root / "corpus").mkdir()
    for i, doc in enumerate(documents[:16]):
        (root / "corpus" / f"doc{i:02d}.txt").write_text(doc)


def write_hf_gpt2(directory: Path, cfg, params: dict) -> None:
    """A GPT-2 as transformers' save_pretrained writes it (config.json and model.safetensors)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
        n_embd=cfg.n_embd))
    with torch.no_grad():
        for name, p in model.transformer.named_parameters():
            value = torch.from_numpy(params[name].copy())
            p.copy_(value.T if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else value)
    model.save_pretrained(directory)


def other_machines(command: str, root: Path, env: dict) -> None:
    """Before ``prepare --merge OUT PARTS...``: the parts the page leaves to other machines
    (data/NAME-TOKENIZER-pIIIofNNN, prepared from NAME/ with --part I/N), prepared here."""
    words = shlex.split(command)
    if "--merge" not in words:
        return
    for part in words[words.index("--merge") + 2:]:
        found = re.fullmatch(r"data/(.+)-(\w+)-p(\d{3})of(\d{3})", part)
        if found and not (root / part).exists():
            name, tokenizer, i, n = found.groups()
            proc = subprocess.run([sys.executable, "-m", "mlx_gpt.prepare", f"{name}/", "--tokenizer", tokenizer,
                                   "--part", f"{int(i)}/{int(n)}"], cwd=root, env=env, capture_output=True, text=True)
            assert proc.returncode == 0, proc.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(port: int, server: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert server.poll() is None, server.stderr.read()[-2000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError("the server did not come up")


def as_run(command: str, port: int) -> tuple[str, bool]:
    """(the command made tiny, whether it serves until stopped)."""
    words = shlex.split(command)
    target = entry_point(words)
    name = target[0] if target else None
    if name == "mlx_gpt.__main__":
        name = "mlx_gpt." + target[1][0]
    extra = list(SHRINK.get(name, []))
    if name == "mlx_gpt.ladder" and "--resume" not in words:
        extra += ["--budgets", "2000" if "tokens" in words else "1"]
        if "--rungs" not in words:
            extra += ["--rungs", "unigram,bigram,gpt"]
    if name == "mlx_gpt.serve":
        extra += ["--port", str(port)]
    command = command.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    return (command + " " + shlex.join(extra)).strip(), name == "mlx_gpt.serve"


@pytest.mark.slow
def test_shell_examples_run_as_written(tmp_path):
    """Every shell command of the README and the docs runs, in a newcomer's order, as written (made
    tiny by flags appended to it), against stand-ins for what this machine cannot download. A
    command whose --out an earlier command made (another page's, or an alternative shown just
    before it) runs after that folder is moved aside."""
    newcomer_workspace(tmp_path)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT), "MLX_GPT_CACHE_DIR": os.environ.get("MLX_GPT_CACHE_DIR", "")}
    env = {k: v for k, v in env.items() if v}
    shown, moved, failed = set(), [], []
    for page, commands in shell_pages():
        servers, serving = [], None
        try:
            for command in commands:
                shown.add(command)
                if command in SHELL_NOT_RUN:
                    continue
                words = shlex.split(command)
                out = next((w for a, w in zip(words, words[1:]) if a == "--out"), None)
                if out and "--resume" not in words and (tmp_path / out).exists():  # made by an earlier page, or an alternative shown before
                    (tmp_path / out).rename(tmp_path / f"{out}.before-{len(moved)}")
                    moved.append(out)
                other_machines(command, tmp_path, env)
                port = free_port()
                line, serves = as_run(command, port)
                if serves:
                    servers.append(subprocess.Popen(["bash", "-c", "exec " + line], cwd=tmp_path, env=env,
                                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
                    wait_until_up(port, servers[-1])
                    serving = port
                    continue
                if serving is not None:  # a client of the server started above
                    line = line.replace(f"127.0.0.1:{port}", f"127.0.0.1:{serving}")
                proc = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True,
                                      timeout=300)
                if proc.returncode != 0 or "Traceback" in proc.stderr:
                    failed.append(f"{page}: {line}\n{proc.stdout[-1000:]}\n{proc.stderr[-2000:]}")
        finally:
            for server in servers:
                server.terminate()
                server.wait(timeout=30)
    assert not failed, "\n\n".join(failed)
    stale = set(SHELL_NOT_RUN) - shown
    assert not stale, f"listed as not run but no longer in the docs: {stale}"
