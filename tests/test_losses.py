"""The training objective: SimVQ's recipe by default, VQGAN's variants behind flags, and the EMA's decay."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from groupvq_hf.training.losses import (
    PatchGANDiscriminator,
    VQGANLoss,
    adaptive_generator_weight,
    hinge_g_loss,
    non_saturating_g_loss,
)
from groupvq_hf.hub import describe_recipe
from groupvq_hf.training import build_ema, build_generator_optimizer, build_loss_fn, parse_args


def test_non_saturating_loss_is_softplus_of_minus_the_per_image_mean_logit():
    logits = torch.tensor([[[[1.0, 3.0], [-2.0, 2.0]]], [[[-4.0, 0.0], [0.0, 0.0]]]])  # (2, 1, 2, 2)
    per_image = torch.tensor([1.0, -1.0])  # mean over each image's patches first (SimVQ's non_saturate_gen_loss)
    expected = torch.log1p(torch.exp(-per_image)).mean()
    assert torch.allclose(non_saturating_g_loss(logits), expected)
    assert not torch.allclose(non_saturating_g_loss(logits), F.softplus(-logits).mean())  # not per patch


def test_default_recipe_is_simvq_non_saturating_with_fixed_weight():
    args = parse_args(["--dataset", "imagenet", "--max_train_steps", "10"])
    assert (args.generator_loss, args.disc_weight, args.adaptive_disc_weight) == ("non_saturating", 0.1, False)
    assert (args.disc_start, args.commitment_weight, args.max_grad_norm, args.ema_warmup) == (0, 1.0, 0.0, False)
    assert (args.learning_rate, args.adam_beta1, args.adam_beta2, args.lr_scheduler) == (1e-4, 0.5, 0.9, "constant")
    assert args.quantizer_learning_rate == 1e-4  # one learning rate for everything, as SimVQ
    demo = parse_args([])  # the CPU-scale recipe: only the projectors' rate and the EMA warm-up differ
    assert (demo.quantizer_learning_rate, demo.ema_warmup, demo.learning_rate) == (1e-2, True, 1e-4)
    explicit = parse_args(["--quantizer_learning_rate", "1e-4", "--ema_warmup", "false"])
    assert (explicit.quantizer_learning_rate, explicit.ema_warmup) == (1e-4, False)
    loss_fn = build_loss_fn(parse_args(["--perceptual_weight", "0"]))
    torch.manual_seed(0)
    disc = PatchGANDiscriminator(3, 8, 2)
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    recon = (pixels + 0.1 * torch.randn_like(pixels)).requires_grad_(True)
    commit = torch.tensor(0.3)
    loss, logs = loss_fn.generator_loss(pixels, recon, commit, step=0, discriminator=disc, last_layer=recon)
    gan = non_saturating_g_loss(disc(recon))
    l1 = (pixels - recon).abs().mean()
    assert float(logs["d_weight"]) == 1.0 and torch.allclose(logs["g_loss"], gan.detach())
    assert torch.allclose(loss, l1 + commit + 0.1 * gan)  # fixed weight 0.1 from step 0


def test_each_flag_selects_its_variant():
    args = parse_args(["--perceptual_weight", "0", "--generator_loss", "hinge", "--adaptive_disc_weight",
                       "--disc_weight", "0.8"])  # fmt: skip
    loss_fn = build_loss_fn(args)
    assert loss_fn.generator_loss_name == "hinge" and loss_fn.adaptive_weight and loss_fn.disc_weight == 0.8
    torch.manual_seed(0)
    disc = PatchGANDiscriminator(3, 8, 2)
    last = torch.nn.Parameter(torch.ones(3, 3, 1, 1))
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    recon = F.conv2d(pixels, last) * 0.3
    loss, logs = loss_fn.generator_loss(pixels, recon, torch.tensor(0.0), step=0, discriminator=disc, last_layer=last)
    gan = hinge_g_loss(disc(recon))
    weight = adaptive_generator_weight((pixels - recon).abs().mean(), gan, last)
    assert torch.allclose(logs["g_loss"], gan.detach()) and torch.allclose(logs["d_weight"], weight)
    assert torch.allclose(loss, (pixels - recon).abs().mean() + 0.8 * weight * gan)
    # non-saturating with the adaptive weight, and hinge with the fixed weight
    assert build_loss_fn(parse_args(["--perceptual_weight", "0", "--adaptive_disc_weight"])).generator_loss_name == (
        "non_saturating"
    )
    assert not build_loss_fn(parse_args(["--perceptual_weight", "0", "--generator_loss", "hinge"])).adaptive_weight
    assert parse_args(["--max_grad_norm", "1"]).max_grad_norm == 1.0 and parse_args(["--ema_warmup"]).ema_warmup
    with pytest.raises(ValueError, match="generator_loss"):
        VQGANLoss(perceptual_weight=0, generator_loss="wasserstein")
    with pytest.raises(SystemExit):
        parse_args(["--generator_loss", "wasserstein"])


def test_ema_decay_is_fixed_by_default_and_ramps_with_ema_warmup():
    param = torch.nn.Parameter(torch.zeros(3))
    fixed = build_ema([param], decay=0.9)
    assert [fixed.get_decay(t) for t in (1, 2, 10, 10_000)] == [0.9] * 4
    with torch.no_grad():
        param.fill_(1.0)
    fixed.step([param])  # first update: 0.9 * 0 + 0.1 * 1
    assert torch.allclose(fixed.shadow_params[0], torch.full((3,), 0.1))
    ramped = build_ema([param], decay=0.9, warmup=True)  # diffusers' default: min(decay, (1 + t) / (10 + t))
    assert ramped.get_decay(1) == 0.0 and ramped.get_decay(3) == pytest.approx(3 / 12)
    assert ramped.get_decay(10_000) == 0.9
    state = fixed.state_dict()
    restored = build_ema([torch.nn.Parameter(torch.zeros(3))], decay=0.5)
    restored.load_state_dict(state)
    assert restored.get_decay(1) == 0.9 and torch.equal(restored.shadow_params[0], fixed.shadow_params[0])
    # --no_ema keeps no EMA: a decay or warm-up given with it is a contradiction, not silently dropped
    assert parse_args(["--no_ema"]).ema_decay == 0.999 and parse_args(["--ema_decay", "0.99"]).ema_decay == 0.99
    for flag in (["--ema_decay", "0.99"], ["--ema_warmup"]):
        with pytest.raises(ValueError, match=f"`{flag[0]}` sets the EMA, which `--no_ema` turns off"):
            parse_args(["--no_ema", *flag])


def test_model_card_says_which_recipe_trained_the_model(tiny_config):
    from groupvq_hf.hub.publishing import render_model_card
    from groupvq_hf.hub import SIMVQ_RECIPE

    named = ["--dataset", "imagenet", "--max_train_steps", "1"]
    default = vars(parse_args(named))
    text = render_model_card(tiny_config, "org/x", training=default).text
    assert "Trained with " + SIMVQ_RECIPE in text and "Changed from that recipe" not in text
    changed = vars(parse_args([*named, "--generator_loss", "hinge", "--adaptive_disc_weight", "--disc_weight", "0.8"]))
    text = render_model_card(tiny_config, "org/x", training=changed).text
    assert "**Changed from that recipe for this run:** `--generator_loss hinge`, `--disc_weight 0.8`, " in text
    assert "`--adaptive_disc_weight True`" in text and "| `generator_loss` | hinge |" in text
    assert "were not supplied" in render_model_card(tiny_config, "org/x").text


def test_projectors_learn_at_the_quantizer_learning_rate(tiny_model):
    optimizer = build_generator_optimizer(tiny_model, parse_args(["--quantizer_learning_rate", "0.02"]))
    backbone, projectors = optimizer.param_groups
    assert projectors["lr"] == 0.02 and backbone["lr"] == 1e-4 and optimizer.defaults["betas"] == (0.5, 0.9)
    assert {id(p) for p in projectors["params"]} == {id(p) for p in tiny_model.quantizer.parameters()}
    assert len(backbone["params"]) + len(projectors["params"]) == len(list(tiny_model.parameters()))
    assert "quantizer_learning_rate 0.01" in describe_recipe(vars(parse_args([])))  # the demo's change is named
    assert "Changed" not in describe_recipe(vars(parse_args(["--dataset", "imagenet", "--max_train_steps", "1"])))
    with pytest.raises(ValueError, match="quantizer_learning_rate"):
        parse_args(["--quantizer_learning_rate", "-1"])
