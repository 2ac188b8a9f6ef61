"""Train flags and config files: every setting documented, files round-trip (flat or sectioned),
flags override files, the run's defaults are resolved alike from Python and the command line, and
a resumed run takes only what the user set."""

import dataclasses
import subprocess
import sys

import pytest

from conftest import ROOT, assert_one_line_error, run_module
from mlx_gpt import flags
from mlx_gpt.errors import UserError
from mlx_gpt.train import build_parser, parse_args
from mlx_gpt.training.config import FINETUNE_DEFAULTS, TrainConfig


def test_every_flag_has_help_and_shows_its_default():
    text = build_parser().format_help()
    for s in flags.settings(TrainConfig):
        assert s.help, s.name
        assert "--" + s.name.replace("_", "-") in text
    assert "(default: 32;" in text and "(default: 'pydoc')" in text and "(default: on)" in text
    assert "(default: None)" not in text and "(default: True)" not in text


def test_only_given_settings_are_taken_and_the_rest_resolved():
    given = flags.parse(build_parser(), TrainConfig, ["--max-iters", "600", "--no-compile"])
    assert given == {"max_iters": 600, "compile": False}
    cfg = parse_args(["--max-iters", "600", "--no-compile"])
    assert cfg.optim.max_iters == 600 and not cfg.step.compile
    assert cfg.step.batch_size == TrainConfig.of().step.batch_size == 32


def test_config_file_round_trips_and_flags_override_it(tmp_path):
    cfg = TrainConfig.of(data="x.txt", n_layer=3, learning_rate=1e-3, sample_prompt='say "hi"\n', bias=False)
    path = tmp_path / "train.toml"
    path.write_text(flags.to_toml(cfg))
    again = parse_args(["--config", str(path)])
    assert again == cfg
    over = parse_args(["--config", str(path), "--n-layer", "5", "--learning-rate", "3e-4"])
    assert over == cfg.replace(n_layer=5, learning_rate=3e-4)


def test_config_files_may_be_sectioned(tmp_path):
    path = tmp_path / "train.toml"
    path.write_text("data = 'x.txt'\n[optim]\nlearning_rate = 1e-3\n[lora]\nlora_rank = 0\n[step]\nbatch-size = 4\n")
    cfg = parse_args(["--config", str(path)])
    assert cfg.data.source == "x.txt" and cfg.optim.learning_rate == 1e-3 and cfg.step.batch_size == 4
    path.write_text("[optim]\nbatch_size = 4\n")
    with pytest.raises(UserError, match="unknown setting 'batch_size' in \\[optim\\]"):
        parse_args(["--config", str(path)])
    path.write_text("batch_size = 4\nbatch-size = 5\n")
    with pytest.raises(UserError, match="set twice"):
        parse_args(["--config", str(path)])


@pytest.mark.parametrize("text,fragment", [("batch_size = 'many'\n", "batch_size must be int"),
                                           ("flavour = 1\n", "unknown setting 'flavour'"),
                                           ("batch_size = \n", "not valid TOML")])
def test_bad_config_files_are_one_line_errors(tmp_path, text, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=fragment):
        parse_args(["--config", str(path)])


def test_non_finite_numbers_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--learning-rate", "nan"])
    assert "invalid float value" in capsys.readouterr().err


def test_fine_tuning_takes_its_defaults_unless_set():
    cfg = parse_args(["--init", "ckpt"])
    assert {k: cfg.flat()[k] for k in FINETUNE_DEFAULTS} == FINETUNE_DEFAULTS
    cfg = parse_args(["--init", "ckpt", "--batch-size", "4"])
    assert cfg.step.batch_size == 4 and cfg.step.grad_accum == FINETUNE_DEFAULTS["grad_accum"]


def test_python_and_the_command_line_resolve_the_same_run():
    """``TrainConfig.of`` is the command line's resolution: a fine-tune from Python takes the
    fine-tune defaults too, and a config built section by section gets them where it left them unset."""
    assert TrainConfig.of(init="ckpt", data="notes.txt") == parse_args(["--init", "ckpt", "--data", "notes.txt"])
    assert TrainConfig.of(init="ckpt", lora_rank=4) == parse_args(["--init", "ckpt", "--lora-rank", "4"])
    from mlx_gpt.training.config import ModelSpec

    nested = TrainConfig(model=ModelSpec(init="ckpt")).resolved()
    assert nested == TrainConfig.of(init="ckpt") and nested.optim.learning_rate == 3e-5


def test_shipped_configs_are_valid():
    paths = sorted((ROOT / "configs").glob("*.toml"))
    assert len(paths) >= 3
    for path in paths:
        flags.read_toml(path, TrainConfig)


def test_mlx_gpt_command_dispatches_to_each_entry_point(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mlx_gpt", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "train" in out.stdout and "generate" in out.stdout
    out = subprocess.run([sys.executable, "-m", "mlx_gpt", "train", "--help"], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0 and "--learning-rate" in out.stdout
    assert_one_line_error(run_module("mlx_gpt", "trian", cwd=tmp_path), "unknown command")
    assert 'mlx-gpt = "mlx_gpt.__main__:main"' in (ROOT / "pyproject.toml").read_text()


def test_resume_takes_a_given_setting_even_when_it_equals_the_default(monkeypatch):
    from mlx_gpt import checkpoint

    saved = {}
    monkeypatch.setattr(checkpoint, "read_config", lambda out: {"train": saved})
    saved.update(TrainConfig.of(max_iters=400, learning_rate=2e-3).flat())
    assert parse_args(["--resume", "--out", "run", "--max-iters", "600"]).optim.max_iters == 600
    cfg = parse_args(["--resume", "--out", "run", "--learning-rate", "2e-3"])
    assert cfg.optim.learning_rate == 2e-3 and cfg.optim.max_iters == 400  # the run's own value: no conflict
    saved.update(TrainConfig.of(learning_rate=1e-3).flat())
    with pytest.raises(UserError, match="--learning-rate 0.002 differs"):
        parse_args(["--resume", "--out", "run", "--learning-rate", "2e-3"])
    assert TrainConfig.of(resume=True, out="run", max_iters=600) == parse_args(["--resume", "--out", "run",
                                                                                 "--max-iters", "600"])


@pytest.mark.parametrize("flag,value", [("tokenizer", "gpt2"), ("preset", "gpt2"), ("model", "gpt")])
def test_a_setting_init_brings_is_refused_beside_it_by_name(flag, value):
    """--init starts from the checkpoint's model and tokenizer: a flag choosing another is refused,
    never ignored; a resumed run of a fine-tune keeps its settings as they were."""
    with pytest.raises(UserError, match=f"--{flag} does not apply with --init"):
        parse_args(["--init", "ckpt", f"--{flag}", value])
    cfg = parse_args(["--init", "ckpt"])
    assert (cfg.data.tokenizer, cfg.model.rung, cfg.model.preset) == (None, None, None)
    assert (TrainConfig.of().data.tokenizer, TrainConfig.of().model.rung, TrainConfig.of().model.preset) == \
        ("byte", "modern", "tiny")


def test_every_command_help_shows_each_default_once_and_none_that_is_not_one(tmp_path):
    """No flag's help says "(default: None)", a switch's "(default: True)", or its default twice."""
    import re

    from mlx_gpt.__main__ import available

    for name in available():
        out = subprocess.run([sys.executable, "-m", "mlx_gpt", name, "--help"], capture_output=True, text=True,
                             cwd=tmp_path, env={"COLUMNS": "1000", "PATH": ""})
        assert out.returncode == 0, (name, out.stderr)
        for line in out.stdout.splitlines():
            assert not re.search(r"\(default: (None|True|False)\)", line), (name, line)
            assert line.count("(default") <= 1, (name, line)
