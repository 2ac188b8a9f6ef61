"""Train flags and config files: every setting documented, files round-trip, flags override files,
and a resumed run takes only what the user set."""

import dataclasses
import subprocess
import sys

import pytest

from conftest import ROOT, assert_one_line_error, run_module
from mlx_gpt import flags
from mlx_gpt.errors import UserError
from mlx_gpt.train import FINETUNE_DEFAULTS, HELP, TrainConfig, build_parser, parse_args


def test_every_flag_has_help_and_shows_its_default():
    text = build_parser().format_help()
    for f in dataclasses.fields(TrainConfig):
        assert f.name in HELP, f.name
        assert "--" + f.name.replace("_", "-") in text
    assert "(default: 32)" in text and "(default: 'pydoc')" in text and "(default: True)" in text


def test_only_given_settings_are_reported_as_given():
    cfg, given = parse_args(["--max-iters", "600", "--no-compile"])
    assert given == {"max_iters", "compile"} and cfg.max_iters == 600 and not cfg.compile
    assert cfg.batch_size == TrainConfig().batch_size


def test_config_file_round_trips_and_flags_override_it(tmp_path):
    cfg = TrainConfig(data="x.txt", n_layer=3, learning_rate=1e-3, sample_prompt='say "hi"\n', bias=False)
    path = tmp_path / "train.toml"
    path.write_text(flags.to_toml(cfg))
    again, given = parse_args(["--config", str(path)])
    assert again == cfg
    over, _ = parse_args(["--config", str(path), "--n-layer", "5", "--learning-rate", "3e-4"])
    assert over == dataclasses.replace(cfg, n_layer=5, learning_rate=3e-4)


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
    cfg, _ = parse_args(["--init", "ckpt"])
    assert {k: getattr(cfg, k) for k in FINETUNE_DEFAULTS} == FINETUNE_DEFAULTS
    cfg, _ = parse_args(["--init", "ckpt", "--batch-size", "4"])
    assert cfg.batch_size == 4 and cfg.grad_accum == FINETUNE_DEFAULTS["grad_accum"]


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


def test_resume_takes_a_given_setting_even_when_it_equals_the_default():
    from mlx_gpt.train import _merge_resumed

    saved = dataclasses.asdict(TrainConfig(max_iters=400, learning_rate=2e-3))
    cli, given = parse_args(["--resume", "--out", "run", "--max-iters", "600"])
    assert _merge_resumed(saved, cli, given).max_iters == 600
    cli, given = parse_args(["--resume", "--out", "run", "--learning-rate", "2e-3"])
    assert _merge_resumed(saved, cli, given).learning_rate == 2e-3  # the run's own value: no conflict
    saved = dataclasses.asdict(TrainConfig(learning_rate=1e-3))
    with pytest.raises(UserError, match="--learning-rate 0.002 differs"):
        _merge_resumed(saved, *parse_args(["--resume", "--out", "run", "--learning-rate", "2e-3"]))
