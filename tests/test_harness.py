"""lm-evaluation-harness runs our checkpoints offline, on custom tasks over local jsonl files, and
its per-example log-likelihoods are ``eval``'s."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

from mlx_gpt import checkpoint, eval as ev
from mlx_gpt.generate import generate
from mlx_gpt.models.gpt import GPTConfig, build
from mlx_gpt.perplexity import total_nll
from mlx_gpt.tokenizer import ByteTokenizer

lm_eval = pytest.importorskip("lm_eval")  # a dev dependency: the test oracle

QUESTIONS = [{"ctx": "The cat sat on the", "endings": ["mat.", "moon, twice", "dog"], "label": 0},
             {"ctx": "Two plus two is", "endings": ["four", "five."], "label": 0},
             {"ctx": "Über naïve café —", "endings": ["oui", "non", "peut-être", "jamais"], "label": 2}]
TEXTS = [{"text": "A long text that runs past the block of the model " * 3}, {"text": "short"}]
PROMPTS = [{"q": "Say hi:", "a": "hi"}, {"q": "Count:", "a": "1 2 3"}]


def tasks(d):
    """Three tasks over local files, one per request type."""
    common = "dataset_path: json\ntest_split: test\n"
    files = {"choice": QUESTIONS, "rolling": TEXTS, "gen": PROMPTS}
    for name, rows in files.items():
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = lambda name: f"dataset_kwargs:\n  data_files:\n    test: {d / name}.jsonl\n"  # noqa: E731
    (d / "choice.yaml").write_text(f"task: t_choice\n{common}{data('choice')}output_type: multiple_choice\n"
                                   "doc_to_text: '{{ctx}}'\ndoc_to_choice: '{{endings}}'\ndoc_to_target: '{{label}}'\n"
                                   "target_delimiter: ' '\nmetric_list:\n  - metric: acc\n")
    (d / "rolling.yaml").write_text(f"task: t_rolling\n{common}{data('rolling')}output_type: loglikelihood_rolling\n"
                                    "doc_to_text: ''\ndoc_to_target: '{{text}}'\n"
                                    "metric_list:\n  - metric: word_perplexity\n")
    (d / "gen.yaml").write_text(f"task: t_gen\n{common}{data('gen')}output_type: generate_until\n"
                                "doc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
                                "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 12\n  do_sample: false\n"
                                "metric_list:\n  - metric: exact_match\n")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    from lm_eval.tasks import TaskManager

    from mlx_gpt.harness import MLXGPT

    assert lm_eval.api.registry.get_model("mlx_gpt") is MLXGPT  # importing the module registers it

    d = tmp_path_factory.mktemp("harness")
    cfg = GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=32)
    model = build(cfg, 3)
    model.update(tree_map(lambda p: p * 10 if p.ndim == 2 else p, model.parameters()))  # sharp: answers vary
    mx.eval(model.parameters())
    ckpt = checkpoint.save(d / "ckpt", model, ByteTokenizer())
    tasks(d)
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_DATASETS_CACHE", str(d / "cache"))
    try:
        results = lm_eval.simple_evaluate(model="mlx_gpt", model_args={"pretrained": str(ckpt), "batch_size": 2},
                                          tasks=["t_choice", "t_rolling", "t_gen"],
                                          task_manager=TaskManager(include_path=str(d)), log_samples=True)
    finally:
        mp.undo()
    model, tok = checkpoint.load(ckpt)
    model.eval()
    return results["samples"], model, tok


def test_loglikelihood_equals_evals_ending_scores(evaluated):
    samples, model, tok = evaluated
    by_ctx = {s["doc"]["ctx"]: s for s in samples["t_choice"]}
    questions = [ev.Question(tok.encode(q["ctx"]), [tok.encode(" " + e) for e in q["endings"]], q["label"])
                 for q in QUESTIONS]
    for q, losses in zip(QUESTIONS, ev.ending_losses(model, questions)):
        got = [r[0][0] for r in by_ctx[q["ctx"]]["resps"]]
        assert got == pytest.approx([-float(np.sum(loss, dtype=np.float64)) for loss in losses], abs=1e-5)
    assert sum(s["acc"] for s in samples["t_choice"]) == ev.evaluate_choices(model, questions).correct


def test_is_greedy_says_whether_greedy_decoding_writes_the_continuation(evaluated):
    from mlx_gpt.harness import score_continuations

    _, model, tok = evaluated
    context, greedy = tok.encode("Two plus two is"), []
    for _ in range(5):  # greedy by full recomputation
        greedy.append(int(mx.argmax(model(mx.array([context + greedy]))[0, -1]).item()))
    flipped = greedy[:-1] + [greedy[-1] ^ 1]
    assert [g for _, g in score_continuations(model, [(context, greedy), (context, flipped)])] == [True, False]


def test_loglikelihood_rolling_equals_evals_perplexity(evaluated):
    samples, model, tok = evaluated
    for s in samples["t_rolling"]:
        text = s["doc"]["text"]
        want = -total_nll(model, np.asarray(tok.encode(text)))[0]  # no end-of-text: the first byte unscored
        assert s["resps"][0][0] == pytest.approx(want, abs=1e-5)


def test_generate_until_is_greedy_generation_cut_at_the_stop(evaluated):
    samples, model, tok = evaluated
    for s in samples["t_gen"]:
        assert s["resps"][0][0] == generate(model, tok, s["doc"]["q"], 12, temperature=0, stop=["."])
