"""Generation against oracles: full recomputation, the model's own top-k sets, plain decoding."""

import subprocess
import sys
from pathlib import Path

import mlx_gpt  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

from mlx_gpt import checkpoint
from mlx_gpt.errors import UserError
from mlx_gpt.decoding import Decoder, Timing
from mlx_gpt.generate import StopStrings, encode_prompt, generate, generate_batch, stream, stream_batch
from mlx_gpt.models.gpt import GPT, GPTConfig, build
from mlx_gpt.sampling import SamplingConfig
from mlx_gpt.tokenizer import ByteTokenizer

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 16
GREEDY = SamplingConfig(temperature=0)


def sharp_model(vocab_size: int = 256, seed: int = 2, cls=GPT) -> GPT:
    """A tiny random GPT with weights scaled up, so its greedy choices depend on the context
    (GPT-2's small init gives near-uniform logits and one repeated token)."""
    cfg = GPTConfig(vocab_size=vocab_size, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32)
    model = cls(cfg)
    model.update(tree_map(lambda p: p * 20 if p.ndim == 2 else p, build(cfg, seed).parameters()))
    model.eval()
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def model():
    return sharp_model()


def recompute_greedy(model, prompt, n, keep, penalty=1.0) -> list[int]:
    """The oracle: a full forward pass over the current window for every token, no cache.

    The window is the last block_size tokens of the prompt; when it would grow past the block
    it restarts from the last `keep` tokens.
    """
    tokens = list(prompt)
    start = max(0, len(tokens) - BLOCK)
    out = []
    for _ in range(n):
        if len(tokens) - start > BLOCK:
            start = len(tokens) - keep
        logits = np.array(model(mx.array([tokens[start:]]))[0, -1])
        if penalty != 1.0:
            seen = sorted(set(tokens))
            logits[seen] = np.where(logits[seen] > 0, logits[seen] / penalty, logits[seen] * penalty)
        out.append(int(np.argmax(logits)))
        tokens.append(out[-1])
    return out


def decoded(decoder, prompt, n, **kw) -> list[list[int]]:
    return list(decoder.tokens(prompt, n, **kw))


# ------------------------------------------------------------------ the cache against recomputation


class EagerGPT(GPT):
    """GPT as a model without fixed-capacity caches would run: its own caches, no compiled step."""

    accepts_fixed_cache = False


@pytest.mark.parametrize("keep", [None, BLOCK, 1, 5])
@pytest.mark.parametrize("compiled", [True, False])
def test_cached_greedy_equals_full_recompute_past_the_block(keep, compiled):
    model = sharp_model(cls=GPT if compiled else EagerGPT)
    decoder = Decoder(model, GREEDY, keep=keep)
    assert decoder.compiled == compiled
    prompt = list(b"The cat ")
    got = [row[0] for row in decoded(decoder, prompt, 3 * BLOCK)]  # slides several times
    want = recompute_greedy(model, prompt, 3 * BLOCK, decoder.keep)
    assert len(set(want)) > 5, "the oracle should not be a constant sequence"
    assert got == want


def test_cached_greedy_with_repetition_penalty_equals_recompute(model):
    decoder = Decoder(model, SamplingConfig(temperature=0, repetition_penalty=1.5), keep=10)
    prompt = list(b"abcabc")
    got = [row[0] for row in decoded(decoder, prompt, 2 * BLOCK + 3)]
    assert got == recompute_greedy(model, prompt, 2 * BLOCK + 3, 10, penalty=1.5)


def test_prompt_longer_than_the_block_is_cropped_with_a_warning(model, capsys):
    prompt = list(b"a prompt much longer than sixteen tokens")
    got = [row[0] for row in decoded(Decoder(model, GREEDY), prompt, 20)]
    assert got == recompute_greedy(model, prompt, 20, Decoder(model, GREEDY).keep)
    assert f"the last {BLOCK}" in capsys.readouterr().err


@pytest.mark.parametrize("cls", [GPT, EagerGPT])
def test_batched_greedy_rows_equal_single(cls):
    model = sharp_model(cls=cls)
    prompt = list(b"xyz")
    single = [row[0] for row in decoded(Decoder(model, GREEDY), prompt, 25)]
    assert single == recompute_greedy(model, prompt, 25, Decoder(model, GREEDY).keep)
    batch = decoded(Decoder(model, GREEDY), prompt, 25, num_samples=3)
    assert all(row == [t] * 3 for row, t in zip(batch, single))


def test_decode_step_is_traced_once():
    class CountingGPT(GPT):
        traced = 0

        def __call__(self, idx, cache=None):
            if idx.shape[1] == 1:  # Python runs here only while mx.compile traces the step
                CountingGPT.traced += 1
            return super().__call__(idx, cache)

    m = sharp_model(cls=CountingGPT)
    decoder = Decoder(m, SamplingConfig(temperature=1.0, top_k=5, repetition_penalty=1.2))
    for seed in range(2):
        decoded(decoder, list(b"hello"), 3 * BLOCK, seed=seed)
    assert CountingGPT.traced == 1


def test_decoder_follows_weight_updates():
    m = sharp_model(seed=0)
    decoder = Decoder(m, GREEDY)
    prompt = list(b"weights")
    first = [r[0] for r in decoded(decoder, prompt, 10)]
    m.update(sharp_model(seed=1).parameters())  # as training does: new arrays, same module
    again = [r[0] for r in decoded(decoder, prompt, 10)]
    assert again == recompute_greedy(m, prompt, 10, decoder.keep) != first


def test_zero_new_tokens_and_bad_arguments(model):
    decoder = Decoder(model, GREEDY)
    assert decoded(decoder, [1, 2], 0) == []
    for kw in (dict(max_new_tokens=-1), dict(num_samples=0)):
        with pytest.raises(UserError):
            decoder.tokens([1], **{"max_new_tokens": 3, **kw})
    with pytest.raises(UserError):
        decoder.tokens([], 3)
    with pytest.raises(UserError):
        Decoder(model, GREEDY, keep=BLOCK + 1)


# ------------------------------------------------------------------ sampling


def test_top_k_1_equals_greedy(model):
    tok = ByteTokenizer()
    greedy = generate(model, tok, "héllo ", 40, temperature=0)
    for seed in (0, 1):
        assert generate(model, tok, "héllo ", 40, temperature=1.3, top_k=1, seed=seed) == greedy


def test_same_seed_same_text_different_seed_different_text(model):
    tok = ByteTokenizer()
    a = generate(model, tok, "Once", 40, temperature=1.0, seed=7)
    assert generate(model, tok, "Once", 40, temperature=1.0, seed=7) == a
    assert generate(model, tok, "Once", 40, temperature=1.0, seed=8) != a


def test_generation_leaves_the_global_random_state_alone(model):
    mx.random.seed(123)
    before = mx.random.uniform(shape=(4,))
    mx.random.seed(123)
    generate(model, ByteTokenizer(), "x", 20, temperature=1.0, top_p=0.9, seed=1)
    np.testing.assert_array_equal(np.array(mx.random.uniform(shape=(4,))), np.array(before))


def test_batched_samples_are_valid_and_reproducible(model):
    """Each row keeps to the model's own top-3 for its own context: rows do not mix."""
    decoder = Decoder(model, SamplingConfig(temperature=2.0, top_k=3))
    prompt = list(b"batch")
    rows = decoded(decoder, prompt, 2 * BLOCK, seed=3, num_samples=4)
    assert rows == decoded(decoder, prompt, 2 * BLOCK, seed=3, num_samples=4)
    samples = [list(s) for s in zip(*rows)]
    assert len({tuple(s) for s in samples}) == 4
    for sample in samples:
        tokens, start = list(prompt), 0
        for t in sample:
            if len(tokens) - start > BLOCK:
                start = len(tokens) - decoder.keep
            logits = np.array(model(mx.array([tokens[start:]]))[0, -1])
            assert t in np.argsort(-logits)[:3]
            tokens.append(t)


def test_generate_batch_texts(model):
    tok = ByteTokenizer()
    texts = generate_batch(model, tok, "Hi", 30, num_samples=3, seed=4, temperature=1.0)
    assert texts == generate_batch(model, tok, "Hi", 30, num_samples=3, seed=4, temperature=1.0)
    assert len(set(texts)) == 3 and all(isinstance(t, str) for t in texts)


# ------------------------------------------------------------------ text: streaming and stops


@pytest.mark.parametrize("kind", ["byte", "sentencepiece"])
@pytest.mark.parametrize("prompt", ["naïve café ", "日本語 🙂"])
def test_streamed_text_equals_decoded_text(kind, prompt, request):
    tok = ByteTokenizer() if kind == "byte" else request.getfixturevalue("sp_tokenizer")
    m = sharp_model(vocab_size=tok.vocab_size)
    sampling = dict(temperature=1.5, seed=11)
    ids = [r[0] for r in decoded(Decoder(m, SamplingConfig(temperature=1.5)), encode_prompt(tok, prompt), 60, seed=11)]
    if tok.eot_id in ids:
        ids = ids[: ids.index(tok.eot_id)]
    pieces = list(stream(m, tok, prompt, 60, **sampling))
    assert "".join(pieces) == tok.decode(ids)
    assert all(pieces)


class ScriptedDecoder:
    """Stands in for Decoder: replays fixed token ids, one list per step."""

    def __init__(self, rows):
        self.rows = rows

    def tokens(self, prompt, max_new_tokens, *, seed, num_samples, timing):
        yield from [list(step) for step in zip(*self.rows)][:max_new_tokens]


def test_end_of_text_ends_each_row_and_is_not_shown(sp_tokenizer):
    tok = sp_tokenizer
    a, b = tok.encode("to be"), tok.encode("or not")
    rows = [a + [tok.eot_id] + b, b + a + [tok.eot_id]]
    steps = list(stream_batch(ScriptedDecoder(rows), tok, "x", 100, seed=0, num_samples=2))
    texts = ["".join(s[i] for s in steps) for i in range(2)]
    assert texts == [tok.decode(a), tok.decode(b + a)]


def test_stop_string_ends_the_text_before_it(model):
    tok = ByteTokenizer()
    full = generate(model, tok, "The cat ", 40, temperature=0)
    stop = full[10:13]
    cut = full.index(stop)
    assert generate(model, tok, "The cat ", 40, temperature=0, stop=[stop, "never appears"]) == full[:cut]
    assert generate(model, tok, "The cat ", 40, temperature=0, stop=["never appears"]) == full


def test_stop_strings_across_pieces():
    s = StopStrings(["END", "xy"])
    out = [s.feed(p) for p in ["abc E", "N", "D!"]]
    assert out == ["abc ", "", ""] and s.stopped and s.flush() == ""
    s = StopStrings(["END"])
    out = [s.feed(p) for p in ["aE", "Nb", "EN"]] + [s.flush()]
    assert "".join(out) == "aENbEN" and out[:2] == ["a", "ENb"] and not s.stopped
    s = StopStrings(["ab", "b"])  # the earliest match wins
    assert s.feed("xab") == "x"


def test_empty_prompt(model, sp_tokenizer):
    with pytest.raises(UserError, match="empty"):
        generate(model, ByteTokenizer(), "", 5)
    assert encode_prompt(sp_tokenizer, "") == [sp_tokenizer.eot_id]
    m = sharp_model(vocab_size=sp_tokenizer.vocab_size)
    assert isinstance(generate(m, sp_tokenizer, "", 5, seed=0), str)


def test_timing_counts_tokens(model):
    timing = Timing()
    generate_batch(model, ByteTokenizer(), "abcd", 12, num_samples=2, seed=0, timing=timing)
    assert (timing.rows, timing.prompt_tokens, timing.new_tokens) == (2, 4, 12)
    assert timing.prompt_tps > 0 and timing.generation_tps > 0 and "tok/s" in timing.summary()


# ------------------------------------------------------------------ the command line


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, model):
    return checkpoint.save(tmp_path_factory.mktemp("ckpt") / "run", model, ByteTokenizer())


def cli(*args, stdin=""):
    # bytes, not text mode: a random model prints "\r", which universal newlines would rewrite
    r = subprocess.run([sys.executable, "-m", "mlx_gpt.generate", *args], cwd=ROOT, input=stdin.encode(),
                       capture_output=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode())


def test_cli_streams_prompt_and_continuation(ckpt, model):
    r = cli("--checkpoint", str(ckpt), "--prompt", "héllo ", "--temperature", "0", "--max-new-tokens", "30",
            "--stop", "@@never@@")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "héllo " + generate(model, ByteTokenizer(), "héllo ", 30, temperature=0) + "\n"
    assert "tok/s" in r.stderr and "Traceback" not in r.stderr


def test_cli_samples_and_interactive(ckpt):
    r = cli("--checkpoint", str(ckpt), "--prompt", "ab", "--num-samples", "3", "--seed", "5", "--max-new-tokens", "8")
    again = cli("--checkpoint", str(ckpt), "--prompt", "ab", "--num-samples", "3", "--seed", "5",
                "--max-new-tokens", "8")
    assert r.returncode == 0 and r.stdout == again.stdout and r.stdout.count("\n---\n") == 2
    r = cli("--checkpoint", str(ckpt), "--interactive", "--temperature", "0", "--max-new-tokens", "5", "--no-echo",
            stdin="one\n\ntwo\n")
    assert r.returncode == 0 and len(r.stdout.split("\n")) == 3 and r.stderr.count("| seed ") == 2
    r = cli("--checkpoint", str(ckpt), "--interactive", "--seed", "3", "--max-new-tokens", "2", stdin="one\ntwo\n")
    assert r.returncode == 0 and "| seed 3\n" in r.stderr and "| seed 4\n" in r.stderr  # the first prompt's is 3
    r = cli("--checkpoint", str(ckpt), "--prompt", "x", "--interactive", "--seed", "3", "--max-new-tokens", "2",
            stdin="one\n")
    assert r.returncode == 0 and "| seed 3\n" in r.stderr and "| seed 4\n" in r.stderr  # --prompt's, then stdin's


def corrupt_checkpoint(ckpt, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ckpt.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    return bad


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "{missing}", "--prompt", "a"], "not found"),
    (["--checkpoint", "{corrupt}", "--prompt", "a"], "corrupt"),
    (["--checkpoint", "{ckpt}", "--prompt", ""], "prompt is empty"),
    (["--checkpoint", "{ckpt}"], "--prompt"),
    (["--checkpoint", "{ckpt}", "--prompt", "a", "--temperature", "-1"], "temperature"),
    (["--checkpoint", "{ckpt}", "--prompt", "a", "--top-p", "0"], "top_p"),
    (["--checkpoint", "{ckpt}", "--prompt", "a", "--top-p", "1.5"], "top_p"),
    (["--checkpoint", "{ckpt}", "--prompt", "a", "--top-k", "-1"], "top_k"),
    (["--checkpoint", "{ckpt}", "--prompt", "a", "--max-new-tokens", "-1"], "max-new-tokens"),
])
def test_cli_bad_input_is_one_line(ckpt, tmp_path, args, message):
    paths = {"missing": tmp_path / "nope", "corrupt": corrupt_checkpoint(ckpt, tmp_path), "ckpt": ckpt}
    r = cli(*(a.format(**paths) for a in args))
    assert r.returncode == 2
    assert r.stderr.startswith("error:") and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert r.stdout == ""


def test_decoder_chooses_blas_threads_at_its_first_generation_and_restores_them(monkeypatch):
    """Matrix-vector threads are measured once per Decoder (the choice, not the speed, is tested)."""
    import mlx_gpt.decoding as gen
    from mlx_gpt import backend
    from mlx_gpt.cpu import blas

    setting = [3]
    measured = []
    monkeypatch.setattr(blas, "get_blas_threads", lambda: setting[0])
    monkeypatch.setattr(blas, "set_blas_threads", lambda n: setting.__setitem__(0, n))
    monkeypatch.setattr(backend, "cpu_cores", lambda: 4)

    def fastest(rows, cols, threads):
        measured.append((rows, cols, threads))
        return 1

    monkeypatch.setattr(blas, "fastest_threads", fastest)
    model = build(GPTConfig(vocab_size=50, block_size=32, n_layer=1, n_head=2, n_embd=16, dropout=0.0), seed=0)
    decoder = gen.Decoder(model, SamplingConfig(temperature=0))
    seen = []
    for _ in decoder.tokens([1, 2, 3], 4):
        seen.append(setting[0])
    assert decoder.blas_threads == 1 and seen == [1, 1, 1, 1]
    assert measured == [(64, 16, 4)]
    assert setting[0] == 3  # the process's setting is back for training
    list(decoder.tokens([1, 2], 2))
    assert len(measured) == 1  # measured once per Decoder


# ------------------------------------------------------------------ chat


def test_chat_reply_ends_with_the_assistants_turn(model):
    from mlx_gpt import chat
    from mlx_gpt.generate import chat_reply
    from mlx_gpt.tokenizer import with_chat_template

    template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% if m.role == 'assistant' %}END{% endif %}\n"
                "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    messages = [{"role": "user", "content": "hi"}]
    prompt = chat.render(template, messages, add_generation_prompt=True)
    free = generate(model, ByteTokenizer(), prompt, 12, temperature=0)
    # the end of the turn: a character the model writes, for the first time, after a few others
    k = next(i for i in range(2, len(free)) if free[i].strip() and free[i] not in free[:i])
    tok = with_chat_template(ByteTokenizer(), template.replace("END", free[k]))
    reply = "".join(chat_reply(Decoder(model, GREEDY), tok, messages, 12, seed=0))
    assert reply == free[:k]


def test_cli_chat_is_multi_turn_with_the_template_and_system(ckpt, model):
    from mlx_gpt import chat

    r = cli("--checkpoint", str(ckpt), "--chat", "--system", "sys", "--temperature", "0", "--max-new-tokens", "10",
            stdin="one\n\ntwo\n")
    assert r.returncode == 0, r.stderr
    messages, want = [{"role": "system", "content": "sys"}], ""
    for turn in ("one", "two"):
        messages.append({"role": "user", "content": turn})
        prompt = chat.render(chat.DEFAULT_TEMPLATE, messages, add_generation_prompt=True)
        reply = generate(model, ByteTokenizer(), prompt, 10, temperature=0, stop=["<|im_end|>"])
        messages.append({"role": "assistant", "content": reply.strip()})
        want += reply + "\n"
    assert r.stdout == want


def test_cli_prompt_file(ckpt, tmp_path):
    (tmp_path / "p.txt").write_text("héllo\nworld ")
    args = ("--checkpoint", str(ckpt), "--temperature", "0", "--max-new-tokens", "8")
    r = cli(*args, "--prompt-file", str(tmp_path / "p.txt"))
    assert r.returncode == 0 and r.stdout == cli(*args, "--prompt", "héllo\nworld ").stdout
    r = cli(*args, "--prompt-file", str(tmp_path / "p.txt"), "--prompt", "a")
    assert r.returncode == 2 and r.stderr.startswith("error:") and "not both" in r.stderr
    (tmp_path / "bad.txt").write_bytes(b"\xff")
    r = cli(*args, "--prompt-file", str(tmp_path / "bad.txt"))
    assert r.returncode == 2 and "not UTF-8" in r.stderr and r.stderr.count("\n") == 1


def test_cli_chat_with_a_broken_template_is_one_error(ckpt, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    r = cli("--checkpoint", str(broken), "--chat", "--max-new-tokens", "2", stdin="hello\n")
    assert r.returncode == 2 and r.stderr.startswith("error: the chat template does not parse") and r.stdout == ""
