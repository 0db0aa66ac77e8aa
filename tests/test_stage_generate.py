"""`nanollm generate` on a tiny real checkpoint and tokenizer: streamed text, sampling options, seeds, stops."""

import re
import subprocess

import click
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import tool_env

from nanollm.checkpoint import save_checkpoint
from nanollm.config import ModelConfig, TokenizerConfig
from nanollm.inference.engine import SamplingParams, generate_batch
from nanollm.inference.generate import generate
from nanollm.model import Transformer
from nanollm.tokenizer import create_tokenizer
from stages.cli import cli

TEXTS = ["def add(a, b):\n    return a + b\n", "class Point:\n    def __init__(self, x):\n        self.x = x\n"] * 3


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    tok = create_tokenizer(TokenizerConfig(vocab_size=300), TEXTS, tmp_path / "data" / "tokenizer", progress=False)
    torch.manual_seed(0)
    # init_std 0.3: an untrained model whose samples vary, so seeds and options visibly matter
    model = Transformer(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, init_std=0.3), tok.vocab_size)
    save_checkpoint(
        tmp_path / "models" / "checkpoint",
        model,
        train_state={"step": 1, "tokens_seen": 0},
        info={"tokenizer_sha256": tok.sha256, "corpus_sha256": "c" * 64},
    )
    _params(tmp_path, {})
    return tmp_path, tok, model.eval()


def _params(root, overrides):
    (root / "params.yaml").write_text(yaml.safe_dump({"tracking": {"enabled": False}, **overrides}))


def _run(*args):
    return CliRunner().invoke(cli, ["generate", *args], catch_exceptions=False)


def test_greedy_output_is_the_prompt_plus_the_decoded_continuation(project):
    root, tok, model = project
    result = _run("--prompt", "def ", "--max-new-tokens", "20", "--temperature", "0", "--threads", "1")
    assert result.exit_code == 0, result.output
    model.pack_for_decode()  # the layout the command decodes in
    ids = list(generate(model, [tok.eot_id, *tok.encode("def ")], 20, temperature=0.0, stop_id=tok.eot_id))
    assert result.stdout == "def " + tok.decode(ids) + "\n"


def test_fixed_seed_repeats_and_another_seed_differs(project):
    args = ("--prompt", "class", "--max-new-tokens", "30", "--temperature", "1.0", "--top-k", "0")
    first, again = _run(*args, "--seed", "3"), _run(*args, "--seed", "3")
    assert first.exit_code == 0 and first.stdout == again.stdout
    assert any(_run(*args, "--seed", str(s)).stdout != first.stdout for s in (4, 5, 6))


def test_text_streams_token_by_token_and_characters_are_never_split(project, monkeypatch):
    _, tok, _ = project
    text = "héllo"  # é is two bytes: with byte-level tokens it may arrive in two pieces
    ids = [i for ch in text for i in tok.encode_bytes(ch.encode())]
    monkeypatch.setattr("nanollm.inference.generate.generate", lambda *a, **k: iter(ids))
    chunks = []
    real_echo = click.echo
    monkeypatch.setattr(click, "echo", lambda message=None, **kw: (chunks.append(message), real_echo(message, **kw)))
    result = _run("--prompt", "x")
    assert result.stdout == "x" + text + "\n"
    pieces = [c for c in chunks[1:-1] if c]  # between the prompt and the final newline
    assert "".join(pieces) == text and len(pieces) >= 3 and "é" in pieces  # streamed, é printed whole


def test_options_default_to_params_and_stop_at_endoftext(project, monkeypatch):
    root, tok, _ = project
    seen = {}

    def spy(model, prompt_ids, max_new_tokens, **kwargs):
        seen.update(kwargs, prompt=list(prompt_ids), n=max_new_tokens)
        return iter([])

    monkeypatch.setattr("nanollm.inference.generate.generate", spy)
    _params(root, {"seed": 9, "eval": {"temperature": 0.5, "top_k": 7, "top_p": 0.9}})
    assert _run("--prompt", "def").exit_code == 0
    assert (seen["temperature"], seen["top_k"], seen["top_p"], seen["n"]) == (0.5, 7, 0.9, 256)
    assert seen["stop_id"] == tok.eot_id and seen["prompt"] == [tok.eot_id, *tok.encode("def")]
    assert torch.equal(seen["generator"].get_state(), torch.Generator().manual_seed(9).get_state())
    assert _run("--top-k", "0", "--top-p", "1", "--temperature", "0", "--max-new-tokens", "5").exit_code == 0
    assert (seen["temperature"], seen["top_k"], seen["top_p"], seen["n"]) == (0.0, None, 1.0, 5)


def test_a_tokenizer_from_another_run_is_refused_in_one_line(project):
    root, _, _ = project
    create_tokenizer(TokenizerConfig(vocab_size=280), ["other text"] * 5, root / "other", progress=False)
    result = _run("--tokenizer", "other")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "pass the matching tokenizer" in lines[0]


def test_bad_option_values_are_usage_errors(project):
    assert _run("--temperature", "-1").exit_code == 2
    assert _run("--top-p", "0").exit_code == 2
    assert _run("--max-new-tokens", "0").exit_code == 2


def test_several_prompts_decode_as_one_batch_each_as_it_would_alone(project):
    _, tok, model = project
    prompts = ["def ", "class Point:", "x"]
    args = [a for p in prompts for a in ("--prompt", p)]
    result = _run(*args, "--max-new-tokens", "8", "--temperature", "0.9", "--top-k", "0", "--seed", "5")
    assert result.exit_code == 0, result.output
    texts = re.split(r"(?:^|\n\n)--- prompt \d of 3 ---\n", result.stdout)[1:]  # the text may hold blank lines
    assert len(texts) == 3
    for i, (prompt, text) in enumerate(zip(prompts, texts, strict=True)):
        ids = [tok.eot_id, *tok.encode(prompt)]
        alone = generate(
            model, ids, 8, temperature=0.9, generator=torch.Generator().manual_seed(5 + i), stop_id=tok.eot_id
        )
        assert text.removesuffix("\n") == prompt + tok.decode(list(alone))
    # and the batch is the engine's: the same ids as generate_batch gives
    params = [SamplingParams(max_tokens=8, temperature=0.9, seed=5 + i) for i in range(3)]
    batched = generate_batch(model, [[tok.eot_id, *tok.encode(p)] for p in prompts], params, stop_id=tok.eot_id)
    assert [t.removesuffix("\n") for t in texts] == [p + tok.decode(n) for p, n in zip(prompts, batched, strict=True)]


def test_compile_decodes_the_same_text_alone_and_in_a_batch(project):
    """--compile: the compiled decode step, one prompt (generate with a CompiledDecoder) and several (the engine)."""
    for prompts in (["def "], ["def ", "class Point:"]):
        args = [a for p in prompts for a in ("--prompt", p)]
        args += ["--max-new-tokens", "20", "--temperature", "0", "--threads", "1"]
        eager, compiled = _run(*args), _run(*args, "--compile")
        assert eager.exit_code == 0 and compiled.exit_code == 0, compiled.output
        assert compiled.stdout == eager.stdout


def test_compile_without_a_cxx_compiler_is_a_one_line_error(project, tmp_path):
    """No working C++ compiler (inductor's CPU code needs one) and an empty compile cache: one line, exit 1."""
    root, _, _ = project
    env = tool_env(CXX="/nonexistent/g++", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    done = subprocess.run(["nanollm", "generate", "--prompt", "def ", "--compile", "--threads", "1"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 1 and done.stdout == ""
    assert "Traceback" not in done.stderr
    [line] = [line for line in done.stderr.splitlines() if "compiling the decode step failed" in line]
    assert "/nonexistent/g++" in line and "--no-compile" in line
