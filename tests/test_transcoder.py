"""Transcoders (model.target_hook) and skip-transcoders (sae.skip) for every variant: the (input, target) stream,
learning a planted sparse map, the skip path's gradient, SAELens exports, and the spliced evaluation."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from saelab.data.sources import build_source
from saelab.metrics.evaluate import evaluate_sae
from saelab.run.member import SAEMember
from saelab.run.module import SAEModule
from saelab.saes import build_sae
from saelab.saes.saelens_format import export_sae, load_exported
from tests.conftest import optim_config

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors, one thread

IN, OUT = "blocks.0.mlp.hook_in", "blocks.0.mlp.hook_out"  # the tiny GPT-2's first MLP: its input and output
TARGETS = {
    "relu": "saelab.saes.relu.ReluSAE",
    "gated": "saelab.saes.gated.GatedSAE",
    "jumprelu": "saelab.saes.jumprelu.JumpReLUSAE",
    "topk": "saelab.saes.topk.TopKSAE",
    "batchtopk": "saelab.saes.batchtopk.BatchTopKSAE",
    "matryoshka_batchtopk": "saelab.saes.matryoshka_batchtopk.MatryoshkaBatchTopKSAE",
}
SPARSITY = {"relu": {"sparsity_coefficient": 0.1}, "gated": {"sparsity_coefficient": 0.1},
            "jumprelu": {"sparsity_coefficient": 0.1, "threshold_init": 0.05},
            "topk": {"k": 4}, "batchtopk": {"k": 4}, "matryoshka_batchtopk": {"k": 4}}
LAYOUTS = {  # (variant, skip) -> the cfg.json architecture; SAELens's names where it has the layout
    ("relu", False): "transcoder", ("relu", True): "skip_transcoder",
    ("jumprelu", False): "jumprelu_transcoder", ("jumprelu", True): "jumprelu_skip_transcoder",
    ("batchtopk", False): "jumprelu_transcoder", ("batchtopk", True): "jumprelu_skip_transcoder",
    ("matryoshka_batchtopk", False): "jumprelu_transcoder", ("matryoshka_batchtopk", True): "jumprelu_skip_transcoder",
    ("topk", False): "saelab_topk_transcoder", ("topk", True): "saelab_topk_skip_transcoder",
    ("gated", False): "saelab_gated_transcoder", ("gated", True): "saelab_gated_skip_transcoder",
}
TEXT_FILES = "saelab.data.sources.text_files.TextFiles"  # data._target_ of data=text_files
PYDOCS = "saelab.data.sources.pydocs.PyDocs"


def make_transcoder(variant: str, skip: bool, d_in: int = 16, d_out: int = 12, **overrides):
    """A transcoder with random, independent parameters (non-unit decoder rows, nonzero biases and skip)."""
    torch.manual_seed(0)
    cfg = {"_target_": TARGETS[variant], "d_in": d_in, "d_sae": 64, "d_out": d_out, "skip": skip,
           "decoder_constraint": "none", **SPARSITY[variant], **overrides}
    sae = build_sae(cfg)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name.startswith(("W_", "b_", "r_")):
                p.normal_(0, 0.3)
        if variant in ("batchtopk", "matryoshka_batchtopk"):
            sae.threshold.fill_(0.2)
    return sae


@pytest.mark.parametrize("variant", list(TARGETS))
@pytest.mark.parametrize("fused", [True, False])
def test_the_skip_path_gets_the_gradient_of_the_target_error(variant, fused, monkeypatch):
    """L = E_b ||t - (x_hat + W_skip x)||^2 => dL/dW_skip = -(2/B) (t - pred)^T x, summed over a Matryoshka SAE's
    levels (each prefix predicts t with the skip path); no other term reaches W_skip (AuxK's residual and the
    Gated L_aux's frozen target are constants)."""
    sae = make_transcoder(variant, skip=True)
    if not fused:
        monkeypatch.setattr(sae, "fused_ok", lambda x: False)
    x, t = torch.randn(32, 16), torch.randn(32, 12)
    out = sae.training_loss(x, dict.fromkeys(sae.scheduled_coefficients, 0.1), target=t)
    sum(out.terms.values()).backward()
    with torch.no_grad():
        pred = sae(x)  # training mode: the same selection as the step (BatchTopK over this batch)
        rec = (t - pred).pow(2).sum(-1).mean()
        f, skip = sae.encode(x), x @ sae.W_skip.T
        widths = sae.widths if variant == "matryoshka_batchtopk" else [64]
        preds = [f[:, :w] @ sae.W_dec[:w] + sae.b_dec + skip for w in widths]
        expected = sum(-(2 / 32) * (t - p).T @ x for p in preds)
    assert out.terms["rec"].item() == pytest.approx(rec.item(), rel=1e-5)
    assert torch.allclose(sae.W_skip.grad, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("variant", "skip"), list(LAYOUTS))
def test_export_reproduces_the_transcoder_on_raw_activations(variant, skip, tmp_path):
    sae = make_transcoder(variant, skip)
    sae.eval()
    in_scale, out_scale = 7.5, 0.3  # the input's and the target's normalisation scales, folded in
    exported = load_exported(export_sae(sae, in_scale, tmp_path / "sae", {}, target_scale=out_scale))
    assert exported.cfg["architecture"] == LAYOUTS[(variant, skip)]
    assert exported.cfg["d_out"] == 12 and exported.cfg["apply_b_dec_to_input"] is False
    x_raw = in_scale * torch.randn(64, 16)
    with torch.no_grad():
        assert torch.allclose(exported(x_raw), out_scale * sae(x_raw / in_scale), atol=1e-4)
        active = (sae.encode(x_raw / in_scale) > 0).sum(-1).float().mean()
    assert 0 < active < 64  # neither empty nor dense: the comparison means something


def planted_map(n: int, d_in: int = 32, d_out: int = 20, n_features: int = 48, active: int = 3,
                affine: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, t, the target's feature directions B, the affine map W) with x = s A, t = s B (+ x W^T): s sparse
    (3 of 48 features, coefficients in [0.5, 1.5]), A and B random unit directions."""
    g = torch.Generator().manual_seed(0)
    A = F.normalize(torch.randn(n_features, d_in, generator=g), dim=1)
    B = F.normalize(torch.randn(n_features, d_out, generator=g), dim=1)
    W = 0.3 * torch.randn(d_out, d_in, generator=g) / d_in**0.5
    ids = torch.rand(n, n_features, generator=g).argsort(dim=1)[:, :active]
    s = torch.zeros(n, n_features).scatter_(1, ids, 0.5 + torch.rand(n, active, generator=g))
    x, t = s @ A, s @ B
    return x, (t + x @ W.T if affine else t), B, W


@pytest.mark.parametrize("skip", [False, True])
def test_a_transcoder_learns_a_planted_sparse_map_through_the_module(skip):
    torch.manual_seed(0)
    x, t, B, W = planted_map(9216, affine=skip)
    sae = build_sae({"_target_": TARGETS["topk"], "d_in": 32, "d_out": 20, "d_sae": 96, "k": 4, "skip": skip,
                     "dead_window_tokens": 20_000})
    held_x, held_t = x[8192:], t[8192:]
    before, _ = evaluate_sae(sae, held_x, 512, targets=held_t)
    optim = optim_config(lr=3e-3, betas=None, lr_warmup_steps=0, lr_warmup="linear", lr_decay_fraction=0.0)
    member = SAEMember(sae, optim, max_steps=600, dead_window_tokens=20_000, hook="in", target_hook="out")
    pairs = [{"in": a, "out": b} for a, b in zip(x[:8192], t[:8192], strict=True)]
    trainer = L.Trainer(max_steps=600, max_epochs=-1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(SAEModule([member]), DataLoader(pairs, batch_size=256, shuffle=True))
    after, _ = evaluate_sae(sae, held_x, 512, targets=held_t)
    assert before["fvu"] > 0.5 and after["fvu"] < 0.15
    if not skip:  # the decoder rows recover the target's feature directions: most have a row at cosine > 0.9
        cosines = F.normalize(sae.W_dec.detach(), dim=1) @ B.T
        assert (cosines.max(0).values > 0.9).float().mean() > 0.8
    else:  # the skip path carries a linear part (not W itself: the best linear map from x to s B is not zero)
        assert sae.W_skip.detach().norm() > 0.5 * W.norm()


class _Recorder:
    """A member's logger that keeps what it is sent."""

    def __init__(self) -> None:
        self.logged: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.logged.append((step, dict(metrics)))


def test_periodic_evaluation_measures_a_transcoder_against_its_target():
    """eval.every_n_steps: a transcoder's eval/* metrics are its target's, as at the end of the run (lr 0 keeps the
    weights fixed, so the step-2 evaluation must equal the target-based one on the same SAE)."""
    from saelab.run.periodic_eval import PeriodicEval

    x, t, _, _ = planted_map(1536, d_in=24, d_out=24)  # same widths: an input-based FVU would still compute
    sae = build_sae({"_target_": TARGETS["topk"], "d_in": 24, "d_out": 24, "d_sae": 48, "k": 4})

    class Pairs(L.LightningDataModule):
        eval_acts = {"in": x[1024:], "out": t[1024:]}

        def train_dataloader(self):
            return DataLoader([{"in": a, "out": b} for a, b in zip(x[:1024], t[:1024], strict=True)], batch_size=256)

    optim = optim_config(lr=0.0, betas=None, lr_warmup_steps=0, lr_warmup="linear", lr_decay_fraction=0.0)
    member = SAEMember(sae, optim, max_steps=4, dead_window_tokens=20_000, hook="in", target_hook="out")
    member.loggers = [recorder := _Recorder()]
    trainer = L.Trainer(max_steps=4, max_epochs=-1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[PeriodicEval(2, 128)])
    trainer.fit(SAEModule([member]), datamodule=Pairs())
    periodic = [m for _, m in recorder.logged if "eval/fvu" in m]
    assert len(periodic) == 1
    on_target, _ = evaluate_sae(sae, x[1024:], 128, targets=t[1024:])
    on_input, _ = evaluate_sae(sae, x[1024:], 128)
    assert on_target["fvu"] != pytest.approx(on_input["fvu"], rel=1e-3)  # the two readings differ here
    assert periodic[0]["eval/fvu"] == pytest.approx(on_target["fvu"], rel=1e-5)
    assert periodic[0]["eval/cosine"] == pytest.approx(on_target["cosine"], rel=1e-5)


@pytest.fixture(scope="module")
def pair_model(tiny_model_dir):
    from saelab.data.model import load_model

    return load_model({"name": "tiny", "path": str(tiny_model_dir), "hook": IN, "dtype": "float32", "device": "cpu"},
                      hooks=[IN, OUT])


def _data_cfg(corpus_dir, cache) -> dict:
    return {"_target_": TEXT_FILES, "source": "text_files",
            "path": str(corpus_dir), "context_size": 32, "prepend_bos": True,
            "eval_fraction": 0.1, "train_tokens": 4096, "batch_size": 256, "buffer_tokens": 2048,
            "model_batch_size": 16, "normalize": "unit_mean_squared_norm", "normalize_tokens": 1024,
            "cache": cache, "cache_dtype": "float32"}


@pytest.mark.parametrize("cached", [False, True])
def test_the_stream_pairs_each_tokens_input_with_its_target(cached, pair_model, tiny_corpus_dir, tmp_path):
    """Every (input, target) row of a batch is one token's activations at the two hooks, as the bridge's own
    run_with_cache gives them for the training windows."""
    from saelab.data.datamodule import ActivationDataModule
    from saelab.data.tokens import keep_mask

    data_cfg = _data_cfg(tiny_corpus_dir, str(tmp_path) if cached else "off")
    dm = ActivationDataModule(data_cfg, pair_model, 1024, source=build_source(data_cfg),
                              seed=3, hooks=[IN, OUT])
    dm.setup()
    assert set(dm.scales) == {IN, OUT} and dm.scales[IN] != dm.scales[OUT]
    windows = dm.windows()["train"]
    with torch.no_grad():
        _, cache = pair_model.bridge.run_with_cache(windows, names_filter=[IN, OUT])
    keep = keep_mask(windows, dm.special)
    inputs, targets = cache[IN][keep], cache[OUT][keep]
    batches = dm.train_batches()
    for _ in range(3):
        batch = next(batches)
        x, t = batch[IN] * dm.scales[IN], batch[OUT] * dm.scales[OUT]
        nearest = torch.cdist(x, inputs).min(1)
        assert (nearest.values < 1e-3 * inputs.norm(dim=1).mean()).all()  # each input is a real token's
        assert torch.allclose(t, targets[nearest.indices], atol=1e-4)  # and its target that token's
    # The held-out pairs too, in corpus order.
    with torch.no_grad():
        _, cache = pair_model.bridge.run_with_cache(dm.eval_windows, names_filter=[IN, OUT])
    keep = keep_mask(dm.eval_windows, dm.special)
    for hook in (IN, OUT):
        held_out = dm.eval_acts[hook] * dm.scales[hook]
        assert torch.allclose(held_out, cache[hook][keep][: len(held_out)], atol=1e-4)


def test_spliced_evaluation_replaces_only_the_target_hook(pair_model, tiny_corpus_dir):
    """With the MLP itself as the 'transcoder' the spliced model is the clean model (the splice reads the MLP's
    input and writes its output, nowhere else); a perturbed prediction changes the loss."""
    from saelab.data.datamodule import ActivationDataModule
    from saelab.metrics.spliced import Transcode, spliced_metrics

    data_cfg = _data_cfg(tiny_corpus_dir, "off")
    dm = ActivationDataModule(data_cfg, pair_model, 1024, seed=3, hooks=[IN, OUT], source=build_source(data_cfg))
    windows = dm.windows(train=False)["eval"][:8]
    mlp = pair_model.bridge.original_model.transformer.h[0].mlp._original_component  # the HF GPT2MLP itself
    exact = spliced_metrics(pair_model, Transcode(lambda a: mlp(a), reads=IN), windows, dm.special, 4, hook=OUT)
    assert exact["ce_sae"] == pytest.approx(exact["ce_clean"], abs=1e-5) and exact["kl_sae"] < 1e-6
    assert exact["ce_zero"] != pytest.approx(exact["ce_clean"], abs=1e-3)  # the hook matters to the output
    noisy = spliced_metrics(pair_model, Transcode(lambda a: mlp(a) + 0.5 * torch.randn_like(a), reads=IN),
                            windows, dm.special, 4, hook=OUT)
    assert noisy["kl_sae"] > 1e-3
