"""Shared fixtures. Everything is offline: a tiny GPT-2 and its tokenizer are built here, in-process."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU, Triton's kernels run in its interpreter (read when triton is first imported, so set here).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist runs one worker per core: each worker, and every process a test starts, then computes on one
# thread (torch's default of one thread per core would put several threads on each core and slow every test).
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = "1"
    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]

_NOUNS = ["cat", "dog", "bird", "fish", "tree", "house", "river", "stone", "cloud", "garden", "window", "letter"]
_ADJS = ["red", "small", "quiet", "bright", "old", "green", "heavy", "soft", "cold", "tall"]
_VERBS = ["sees", "finds", "follows", "paints", "carries", "watches", "moves", "opens"]


def synthetic_sentences(n: int, seed: int = 0) -> list[str]:
    """Grammatical sentences over a small vocabulary: structured text for a tiny model."""
    rng = random.Random(seed)
    return [
        f"the {rng.choice(_ADJS)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} the {rng.choice(_NOUNS)}."
        for _ in range(n)
    ]


def build_tiny_model(directory: Path, n_layer: int = 2, d_model: int = 32, seed: int = 0) -> Path:
    """A random 2-layer GPT-2 and a BPE tokenizer trained on the synthetic sentences, saved as a HF dir."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<|endoftext|>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(synthetic_sentences(500), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<unk>")
    fast.save_pretrained(directory)
    config = GPT2Config(vocab_size=len(fast), n_positions=64, n_embd=d_model, n_layer=n_layer, n_head=4,
                        bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_corpus_dir(tmp_path_factory) -> Path:
    """400 small documents of synthetic sentences."""
    directory = tmp_path_factory.mktemp("tiny_corpus")
    sentences = synthetic_sentences(4000, seed=1)
    for i in range(400):
        (directory / f"doc{i:03d}.txt").write_text(" ".join(sentences[10 * i : 10 * i + 10]))
    return directory


def optim_config(**changes) -> dict:
    """The optim section as the shipped config has it (saelab/conf/optim/adam.yaml), with `changes`: tests that
    build a member by hand start from the real defaults instead of repeating them."""
    from omegaconf import OmegaConf

    from saelab.run.compose import CONF_DIR

    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "optim" / "adam.yaml")) | changes


def tiny_overrides(model_dir: Path, corpus_dir: Path, out_dir: Path) -> list[str]:
    """Overrides for a fast CLI run on the tiny model and corpus."""
    return [
        "model=tiny", f"model.path={model_dir}", "data=text_files", f"data.path={corpus_dir}",
        "data.context_size=32", "data.batch_size=256", "data.buffer_tokens=2048", "data.model_batch_size=16",
        "data.normalize_tokens=1024", "data.train_tokens=25600", "eval.tokens=2048", "eval.batch_size=512",
        "sae.expansion_factor=4", "logger=csv", f"paths.output_dir={out_dir}", "callbacks.progress_bar.refresh_rate=0",
    ]


def run_module(module: str, args: list[str], cwd: Path | None = None, timeout: int = 600,
               fresh: bool = False) -> subprocess.CompletedProcess:
    """`python -m module args` (a command whose `main()` reads sys.argv) in its own process: forked from a warm
    one (tests/cli_fork.py), or a new interpreter where `fresh` (what a fresh process prints) or
    SAELAB_TEST_FRESH_CLI=1 asks for one."""
    if not (fresh or os.environ.get("SAELAB_TEST_FRESH_CLI") == "1"):
        from tests.cli_fork import run_forked

        return run_forked(args, cwd or REPO, timeout, entry=f"{module}:main", prog=module)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ})


def run_cli(args: list[str], cwd: Path | None = None, timeout: int = 600,
            fresh: bool = False) -> subprocess.CompletedProcess:
    """`saelab-train args` in its own process (run_module)."""
    return run_module("saelab.cli.train", args, cwd, timeout, fresh)


def assert_one_line_refusal(args: list[str], field: str, out: Path) -> None:
    """saelab-train refuses `args` in one line naming `field`, and leaves no metrics.json under `out`."""
    result = run_cli(args)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and field in last, result.stderr[-2000:]
    assert not list(out.rglob("metrics.json"))


def run_until_then_kill(args: list[str], ready, timeout: float = 300) -> subprocess.Popen:
    """Start `python -m saelab.cli.train args` and SIGKILL it (its whole process group) as soon as `ready()` is
    true; the caller asserts it really was killed (returncode == -SIGKILL), not finished first."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "saelab.cli.train", *args], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return proc


@pytest.fixture
def one_thread():
    """Tiny tensors on a shared 2-core machine: extra threads only contend (10x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
