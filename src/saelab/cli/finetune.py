"""`saelab-finetune --out DIR [overrides]`: a short, deterministic fine-tune of the configured model on the
training text of the configured corpus, saved as a local model directory, the second model of a diffing run
(`model.diff_with=DIR`).

The model and corpus are saelab's own sections (`model=minilm data=pydocs` by default, any override as for
saelab-train); the held-out documents (data.eval_fraction) are left out, so a diffing run's evaluation reads text
neither model trained on. A causal LM trains on next-token loss; an encoder (MiniLM: a bare BertModel, no MLM
head) on masked-token loss read out through its own word embeddings (BERT's tied decoder), which stay fixed while
every block trains. The saved directory has the input's architecture and tokenizer, so it loads like any local
model. Same seed, same settings, same machine: the same weights (a test checks it bit for bit).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saelab.errors import ConfigError, bad_input_exit, check_positive

log = logging.getLogger("saelab.finetune")
IGNORE = -100  # cross_entropy's ignored label


@dataclass(frozen=True)
class Settings:
    steps: int = 150  # optimiser steps
    batch_windows: int = 16  # token windows per step
    lr: float = 1e-5  # AdamW learning rate (linear warm-up over the first tenth, then constant)
    mask_fraction: float = 0.15  # an encoder's masked real-text tokens (BERT's 15%)
    seed: int = 0  # window order, masks, dropout

    def check(self) -> None:
        for field in ("steps", "batch_windows"):
            check_positive(f"--{field.replace('_', '-')}", getattr(self, field), integer=True)
        check_positive("--lr", self.lr)
        if not 0 < self.mask_fraction < 1:
            raise ConfigError("--mask-fraction", self.mask_fraction, "a fraction between 0 and 1")


def training_windows(cfg: Any) -> tuple[Tensor, Any, Any]:
    """(the corpus's training windows [n, context_size], the tokenizer, its special tokens): the documents a run
    on this config trains on, packed as the activation stream packs them."""
    from transformers import AutoTokenizer

    from saelab.data.sources import TextSource, build_source
    from saelab.data.tokens import SpecialTokens, pack, split_documents, tokenize

    source = build_source(cfg.data)
    if not isinstance(source, TextSource):
        raise ConfigError("data", source.name, "a text source (one read through a model): there is no text to "
                          "fine-tune on")
    tokenizer = AutoTokenizer.from_pretrained(model_directory(cfg.model))
    special = SpecialTokens.from_tokenizer(tokenizer)
    train_docs, _ = split_documents(source.documents(), float(cfg.data.eval_fraction))
    windows = pack(tokenize(train_docs, tokenizer), int(cfg.data.context_size), special, bool(cfg.data.prepend_bos))
    if len(windows) == 0:
        raise ConfigError("data", source.name, f"text with at least {cfg.data.context_size} training tokens")
    return windows, tokenizer, special


def model_directory(model_cfg: Any) -> str:
    path = model_cfg.get("path")
    if not path or not Path(str(path)).expanduser().is_dir():
        raise ConfigError("model.path", path, "a local model directory (the model to fine-tune)")
    return str(Path(str(path)).expanduser())


def load_trainable(directory: str) -> tuple[nn.Module, bool]:
    """(the model in float32, in training mode; whether it is a causal LM). An encoder's embeddings are frozen:
    they are its masked-token readout."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    causal = any(a.endswith(("CausalLM", "LMHeadModel")) for a in config.architectures or [])
    model = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(directory, dtype=torch.float32)
    if not causal:
        model.get_input_embeddings().requires_grad_(False)
    return model.train(), causal


def step_loss(model: nn.Module, causal: bool, windows: Tensor, keep: Tensor, mask_token: int | None,
              settings: Settings, generator: torch.Generator) -> Tensor:
    """Next-token loss over real-text targets (causal), or masked-token loss over a random mask_fraction of the
    real-text tokens read out through the word embeddings (encoder)."""
    if causal:
        labels = windows.masked_fill(~keep, IGNORE)
        return model(input_ids=windows, labels=labels).loss
    chosen = keep & (torch.rand(windows.shape, generator=generator) < settings.mask_fraction)
    hidden = model(input_ids=windows.masked_fill(chosen, mask_token),
                   attention_mask=torch.ones_like(windows)).last_hidden_state
    logits = hidden[chosen] @ model.get_input_embeddings().weight.T
    return F.cross_entropy(logits, windows[chosen])


def finetune(cfg: Any, out: Path, settings: Settings) -> dict[str, Any]:
    """Fine-tune, save to `out` (written beside it, then moved into place: an interrupted run leaves no model
    directory that looks finished), and return the record saved as its finetune.json."""
    from transformers.utils import logging as hf_logging

    from saelab.data.tokens import keep_mask

    settings.check()
    hf_logging.disable_progress_bar()  # the log says what is loaded and saved
    directory = model_directory(cfg.model)
    windows, tokenizer, special = training_windows(cfg)
    torch.manual_seed(settings.seed)
    model, causal = load_trainable(directory)
    if not causal and tokenizer.mask_token_id is None:
        raise ConfigError("model.path", directory, "a causal LM, or an encoder whose tokenizer has a mask token")
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr)
    warmup = max(1, settings.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: min(1.0, (step + 1) / warmup))
    generator = torch.Generator().manual_seed(settings.seed)
    order = torch.randperm(len(windows), generator=generator)
    losses = []
    for step in range(settings.steps):
        start = (step * settings.batch_windows) % len(windows)
        batch = windows[order[start : start + settings.batch_windows]]
        loss = step_loss(model, causal, batch, keep_mask(batch, special), tokenizer.mask_token_id, settings, generator)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == settings.steps - 1:
            log.info("step %d/%d: loss %.4f", step + 1, settings.steps, losses[-1])
    record = {"base": directory, "objective": "next-token" if causal else "masked-token (tied embeddings)",
              "windows": len(windows), "context_size": int(cfg.data.context_size), "data": str(cfg.data.source),
              **asdict(settings), "first_loss": losses[0], "last_loss": losses[-1],
              "mean_loss_last_tenth": sum(losses[-warmup:]) / warmup}
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.eval().save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / "finetune.json").write_text(json.dumps(record, indent=2) + "\n")
    partial.rename(out)
    return record


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="saelab-finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the new model directory (must not exist)")
    defaults = Settings()
    for field, value in asdict(defaults).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("overrides", nargs="*", help="saelab config overrides, e.g. model=minilm data=pydocs")
    args = parser.parse_args(argv)
    return args, list(args.overrides)


def main(argv: list[str] | None = None) -> int:
    from saelab.run.compose import compose_run_config

    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        out = Path(args.out).expanduser()
        if out.exists():
            raise ConfigError("--out", str(out), "a directory that does not exist yet")
        settings = Settings(**{f: getattr(args, f) for f in asdict(Settings())})  # checked by finetune()
        import saelab.data.model  # noqa: F401  registers the package_model_path resolver

        record = finetune(compose_run_config(overrides), out, settings)
    except Exception as err:
        return bad_input_exit(err)
    log.info("saved %s (loss %.4f -> %.4f); use it as model.diff_with=%s", out, record["first_loss"],
             record["mean_loss_last_tenth"], out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
