"""Codebook analysis (section 4.2, appendix D): statistics against direct computations, figures, the script."""

import importlib.util
import io
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from groupvq_hf import GroupVectorQuantizer, GroupVQConfig, GroupVQModel
from groupvq_hf.evaluation.analysis import (
    FIGURE_NAMES,
    analyze_codebook,
    cosine_similarity_statistics,
    count_code_usage,
    figure_to_array,
    figure_to_png,
    new_code_mask,
    norm_statistics,
    pca_projection,
    plot_group_frequency,
    random_projection_matrix,
    resolve_trained_group_sizes,
    sample_group_codes,
    trained_new_usage_statistics,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SMALL = ["--heatmap_codes_per_group", "6", "--scatter_codes_per_group", "5", "--highlight_codes_per_group", "12",
         "--dpi", "40", "--device", "cpu"]


def _load_script():
    spec = importlib.util.spec_from_file_location("analyze_codebook", os.path.join(REPO_ROOT, "scripts", "analyze_codebook.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _trained_like(model, seed=0):
    """Give every group its own bias and projector scale, as training does, so groups differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        q = model.quantizer
        q.bias.copy_(torch.randn(q.bias.shape, generator=g) * 2)
        q.weight.mul_(torch.linspace(0.5, 2.0, q.num_groups)[:, None, None])
    return model


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """A tiny model and its self-extension (256 -> 512 codes), both saved."""
    root = tmp_path_factory.mktemp("analysis_models")
    torch.manual_seed(0)
    model = _trained_like(GroupVQModel(GroupVQConfig.from_preset("tiny"))).eval()
    model.save_pretrained(root / "tiny")
    model.resize_codebook(512, mode="extend", seed=3)
    model.save_pretrained(root / "extended")
    return root / "tiny", root / "extended"


def _check_png_file(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == PNG_SIGNATURE
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        assert image.width > 0 and image.height > 0


def _direct_norm_stats(codebook, sizes):
    norms = codebook.double().norm(dim=1).numpy()
    out, start = [], 0
    for n in sizes:
        out.append((norms[start : start + n].mean(), norms[start : start + n].var()))  # numpy var: population
        start += n
    return out


def _direct_cosine(codebook, sampled):
    """Within- and between-group mean cosine similarity by an explicit loop over pairs."""
    codes = codebook.double().numpy()
    flat = [(g, i) for g, idx in enumerate(sampled) for i in idx]
    within, between = [], []
    for (ga, a), (gb, b) in itertools.permutations(flat, 2):
        u, v = codes[a], codes[b]
        cos = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
        (within if ga == gb else between).append(cos)
    return np.mean(within), np.mean(between)


def _direct_pca(codebook, x):
    """Standardise over all codes, SVD, project: coordinates and explained-variance ratio of the top 2 axes."""
    c = codebook.double().numpy()
    mean, std = c.mean(0), c.std(0)
    _, s, vt = np.linalg.svd((c - mean) / std, full_matrices=False)
    ratio = s**2 / (s**2).sum()
    return ((x.double().numpy() - mean) / std) @ vt[:2].T, ratio[:2]


def test_script_on_tiny_model_writes_pngs_and_matching_json(saved_models, tmp_path):
    tiny, _ = saved_models
    paths = _load_script().main(["--model", str(tiny), "--output_dir", str(tmp_path), "--seed", "4", *SMALL])
    expected = set(FIGURE_NAMES) - {"group_frequency"}  # no dataset given: no usage figure
    assert set(paths) == expected | {"json"}
    for name in expected:
        assert paths[name] == os.path.join(tmp_path, f"{name}.png")
        _check_png_file(paths[name])
    stats = json.loads(open(paths["json"]).read())
    assert "usage" not in stats

    model = GroupVQModel.from_pretrained(tiny)
    q = model.quantizer
    codebook, bias = q.codebook().detach(), q.bias.detach()
    assert stats["group_sizes"] == q.group_sizes == [32] * 8
    assert stats["trained_group_sizes"] is None and stats["seed"] == 4
    for j, (mean, var) in enumerate(_direct_norm_stats(codebook, q.group_sizes)):
        assert stats["norm"]["mean"][j] == pytest.approx(mean, rel=1e-5)
        assert stats["norm"]["var"][j] == pytest.approx(var, rel=1e-4)
    assert stats["highlight_groups"]["smallest_norm_variance"] == int(np.argmin(stats["norm"]["var"]))
    assert stats["highlight_groups"]["largest_norm_variance"] == int(np.argmax(stats["norm"]["var"]))

    cos = stats["cosine_similarity"]
    sampled = cos["sampled_indices"]
    assert [len(s) for s in sampled] == [6] * 8
    assert all(32 * j <= i < 32 * (j + 1) for j, s in enumerate(sampled) for i in s) and all(s == sorted(set(s)) for s in sampled)
    within, between = _direct_cosine(codebook, sampled)
    assert cos["within_group_mean"] == pytest.approx(within, abs=1e-5)
    assert cos["between_group_mean"] == pytest.approx(between, abs=1e-5)
    assert cos["within_group_mean"] > cos["between_group_mean"]  # distinct biases: the checkerboard of Fig. 6

    rp = torch.tensor(stats["random_projection"]["matrix"])
    assert torch.equal(rp, random_projection_matrix(q.codebook_dim, 4))
    np.testing.assert_allclose(stats["random_projection"]["bias_coordinates"], (bias @ rp).numpy(), rtol=1e-5, atol=1e-5)
    coords, ratio = _direct_pca(codebook, bias)
    np.testing.assert_allclose(stats["pca"]["explained_variance_ratio"], ratio, rtol=1e-4)
    # Principal axes are defined up to sign.
    np.testing.assert_allclose(np.abs(stats["pca"]["bias_coordinates"]), np.abs(coords), rtol=1e-3, atol=1e-3)


def test_script_on_self_extended_model_marks_trained_and_new_codes(saved_models, tmp_path):
    tiny, extended = saved_models
    paths = _load_script().main(
        ["--model", str(extended), "--output_dir", str(tmp_path), "--trained_codebook_size", "256", *SMALL]
    )
    for name in set(FIGURE_NAMES) - {"group_frequency"}:
        _check_png_file(paths[name])
    stats = json.loads(open(paths["json"]).read())
    assert stats["codebook_size"] == 512 and stats["trained_group_sizes"] == [32] * 8

    codebook = GroupVQModel.from_pretrained(extended).quantizer.codebook().detach()
    trained = torch.cat([codebook[64 * j : 64 * j + 32] for j in range(8)])
    new = torch.cat([codebook[64 * j + 32 : 64 * (j + 1)] for j in range(8)])
    for kind, part in (("trained", trained), ("new", new)):
        for j, (mean, var) in enumerate(_direct_norm_stats(part, [32] * 8)):
            assert stats["norm"][f"{kind}_mean"][j] == pytest.approx(mean, rel=1e-5)
            assert stats["norm"][f"{kind}_var"][j] == pytest.approx(var, rel=1e-4)
    # Self-extension keeps the trained codes: their statistics are the original model's.
    original = GroupVQModel.from_pretrained(tiny).quantizer.codebook().detach()
    for j, (mean, var) in enumerate(_direct_norm_stats(original, [32] * 8)):
        assert stats["norm"]["trained_mean"][j] == pytest.approx(mean, rel=1e-4)
        assert stats["norm"]["trained_var"][j] == pytest.approx(var, rel=1e-3)

    cos = stats["cosine_similarity"]
    codes = torch.nn.functional.normalize(codebook.double(), dim=1)
    pairs = {"trained_trained": [], "new_new": [], "trained_new": []}
    for j, idx in enumerate(cos["sampled_indices"]):
        for a, b in itertools.permutations(idx, 2):
            a_new, b_new = a - 64 * j >= 32, b - 64 * j >= 32
            key = "new_new" if a_new and b_new else "trained_trained" if not (a_new or b_new) else None
            if key is None and not a_new:
                key = "trained_new"
            if key is not None:
                pairs[key].append(float(codes[a] @ codes[b]))
    for key, values in pairs.items():
        assert cos[f"within_group_{key}_mean"] == pytest.approx(np.mean(values), abs=1e-5)


def test_script_with_demo_dataset_writes_usage_frequency(saved_models, tmp_path):
    """Run as a user runs it (`python scripts/analyze_codebook.py --dataset demo ...`): with scripts/ first on the
    import path, `import evaluate` inside the package must still find the library, not scripts/evaluate.py."""
    tiny, _ = saved_models
    command = [
        sys.executable, "scripts/analyze_codebook.py", "--model", str(tiny), "--output_dir", str(tmp_path),
        "--dataset", "demo", "--split", "validation", "--resolution", "32", "--max_samples", "3", "--batch_size", "2",
        *SMALL,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "encoded 3 images of demo/validation" in done.stderr
    paths = json.loads(done.stdout[done.stdout.index("{") :])
    _check_png_file(paths["group_frequency"])
    usage = json.loads(open(paths["json"]).read())["usage"]
    assert usage["dataset"] == "demo" and usage["num_images"] == 3
    side = 32 // GroupVQConfig.from_preset("tiny").downsample_factor
    assert usage["num_tokens"] == 3 * side * side  # 3 images of 32x32, one code per latent position
    assert sum(usage["group_frequency"]) == pytest.approx(1.0)
    assert usage["expected_frequency"] == [1 / 8] * 8


def test_usage_statistics_from_known_indices():
    sizes = [2, 3, 5]
    indices = torch.tensor([0, 0, 1, 2, 9, 9, 9, 5, 5, 0])
    counts = torch.bincount(indices, minlength=10)
    stats = trained_new_usage_statistics(counts, sizes)
    assert stats["num_tokens"] == 10
    assert stats["group_frequency"] == [4 / 10, 1 / 10, 5 / 10]
    assert stats["group_usage"] == [1.0, pytest.approx(1 / 3), pytest.approx(2 / 5)]
    assert stats["expected_frequency"] == [0.2, 0.3, 0.5]
    assert stats["codebook_usage"] == pytest.approx(5 / 10)  # codes 0, 1, 2, 5, 9
    # Trained = first 1, 2, 3 codes of the groups: codes 0 | 2, 3 | 5, 6, 7.
    mask = new_code_mask(sizes, [1, 2, 3])
    assert mask.tolist() == [False, True, False, False, True, False, False, False, True, True]
    split = trained_new_usage_statistics(counts, sizes, mask)
    assert split["trained_group_frequency"] == [3 / 10, 1 / 10, 2 / 10]
    assert split["new_group_frequency"] == [1 / 10, 0.0, 3 / 10]
    assert split["trained_group_usage"] == [1.0, 0.5, pytest.approx(1 / 3)]
    # The quantizer's own per-group frequency agrees.
    q = GroupVectorQuantizer(10, 4, group_sizes=sizes)
    with q.counting_usage():
        q.quantize_tokens(q.codebook().detach()[indices])
    assert q.group_frequency() == pytest.approx(stats["group_frequency"])


def test_usage_statistics_have_the_quantizers_names_only():
    sizes = [2, 3, 5]
    counts = torch.bincount(torch.tensor([0, 0, 1, 2, 9, 9, 9, 5, 5, 0]), minlength=10)
    mask = new_code_mask(sizes, [1, 2, 3])
    stats = trained_new_usage_statistics(counts, sizes, mask)
    core = GroupVectorQuantizer(10, 4, group_sizes=sizes).eval()
    with core.counting_usage():
        core.quantize_tokens(core.codebook().detach()[torch.repeat_interleave(torch.arange(10), counts)])
    assert {k: stats[k] for k in core.usage_statistics()} == core.usage_statistics()
    assert stats["trained_group_frequency"] == [3 / 10, 1 / 10, 2 / 10] and stats["new_group_usage"] == [1.0, 0.0, 0.5]
    # One set of names: the quantizer's (the names files written before they were shared used are gone).
    assert not {"total_hits", "frequency", "usage", "trained_frequency", "new_usage"} & set(stats)
    assert figure_to_png(plot_group_frequency(stats), dpi=30)[:8] == PNG_SIGNATURE
    assert trained_new_usage_statistics(torch.zeros(10, dtype=torch.long), sizes)["perplexity"] is None  # JSON has no NaN


def test_count_code_usage_matches_encode_and_leaves_quantizer_counters(tiny_model):
    generator = torch.Generator().manual_seed(1)
    batches = [torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1 for _ in range(3)]
    tiny_model.quantizer.reset_usage()
    # a batch of undecodable images only arrives empty (collate_pixels drops them): skipped, not the end
    with_empty = [batches[0], torch.empty(0, 3, 0, 0), *batches[1:]]
    counts, seen = count_code_usage(tiny_model, ({"pixel_values": b} for b in with_empty), max_samples=5)
    assert seen == 5 and int(counts.sum()) == 5 * 8 * 8  # tiny: f = 4, 32x32 -> 8x8 codes
    with torch.no_grad():
        indices = tiny_model.encode(torch.cat(batches)[:5]).indices
    assert torch.equal(counts, torch.bincount(indices.flatten(), minlength=256))
    tiny_model.quantizer.reset_usage()
    tiny_model.train().quantizer.track_usage = True  # even a quantizer told to count every forward is left as it was
    count_code_usage(tiny_model, batches)
    assert int(tiny_model.quantizer.usage_counts().sum()) == 0 and tiny_model.quantizer.track_usage is True
    assert tiny_model.training
    with pytest.raises(ValueError, match="max_samples"):
        count_code_usage(tiny_model, batches, max_samples=0)
    with pytest.raises(ValueError, match="batches"):
        count_code_usage(tiny_model, [[1, 2]])


def test_heterogeneous_groups_statistics_and_figures():
    torch.manual_seed(0)
    q = GroupVectorQuantizer(28, 6, group_sizes=[4, 8, 16], group_ranks=[2, 3, 6])
    with torch.no_grad():
        q.bias.copy_(torch.randn(3, 6))
    counts = torch.arange(28)
    analysis = analyze_codebook(q, usage_counts=counts, heatmap_codes_per_group=10, scatter_codes_per_group=3)
    assert set(analysis.figures) == set(FIGURE_NAMES)
    assert [len(s) for s in analysis.stats["cosine_similarity"]["sampled_indices"]] == [4, 8, 10]
    assert analysis.stats["highlight_groups"]["highest_frequency"] == 2
    for name in analysis.figures:
        assert analysis.png(name, dpi=30)[:8] == PNG_SIGNATURE
    image = figure_to_array(analysis.figures["norm_statistics"], dpi=30)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.size > 0
    json.dumps(analysis.stats, allow_nan=False)
    stats = norm_statistics(q.codebook().detach(), [4, 8, 16])
    for j, (mean, var) in enumerate(_direct_norm_stats(q.codebook().detach(), [4, 8, 16])):
        assert stats["mean"][j] == pytest.approx(mean, rel=1e-5) and stats["var"][j] == pytest.approx(var, rel=1e-4)


def test_cosine_similarity_and_pca_known_answers():
    # Two groups pointing along orthogonal axes: within-group similarity 1, between 0.
    codebook = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [0.0, 1.0]])
    sampled = sample_group_codes([2, 2], 5, seed=0)
    assert [s.tolist() for s in sampled] == [[0, 1], [2, 3]]
    sim, stats = cosine_similarity_statistics(codebook, sampled)
    assert torch.allclose(sim, torch.tensor([[1.0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]))
    assert stats["within_group_mean"] == pytest.approx(1.0) and stats["between_group_mean"] == pytest.approx(0.0)
    assert stats["group_pair_mean"] == [[pytest.approx(1.0), 0.0], [0.0, pytest.approx(1.0)]]
    # Points on a line: all variance on PC1.
    line = torch.tensor([[0.0, 0.0], [1.0, 2.0], [2.0, 4.0], [3.0, 6.0]])
    pca = pca_projection(line)
    assert pca.explained_variance_ratio == [pytest.approx(1.0), pytest.approx(0.0, abs=1e-9)]
    coords = pca(line)
    assert torch.allclose(coords[:, 1], torch.zeros(4), atol=1e-5)
    assert torch.allclose(coords[:, 0].pow(2).mean(), torch.tensor(2.0), atol=1e-5)  # two unit-variance dims


def test_figures_do_not_touch_pyplot_state():
    import matplotlib
    from matplotlib import pyplot
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    backend, open_figures = matplotlib.get_backend(), list(pyplot.get_fignums())
    q = GroupVectorQuantizer(16, 4, num_groups=4)
    analysis = analyze_codebook(q, trained_group_sizes=[2, 4, 3, 1], heatmap_codes_per_group=2, scatter_codes_per_group=2)
    assert figure_to_png(analysis.figures["cosine_similarity"], dpi=30)[:8] == PNG_SIGNATURE
    assert matplotlib.get_backend() == backend
    assert pyplot.get_fignums() == open_figures  # figures are not registered with pyplot
    assert all(isinstance(fig.canvas, FigureCanvasAgg) for fig in analysis.figures.values())


def test_bad_arguments_raise_value_error():
    q = GroupVectorQuantizer(16, 4, num_groups=4)
    assert resolve_trained_group_sizes(8, [4, 4, 4, 4]) == [2, 2, 2, 2]
    assert resolve_trained_group_sizes(None, [4, 4]) is None
    with pytest.raises(ValueError, match="trained_group_sizes"):
        resolve_trained_group_sizes([1, 2], [4, 4, 4, 4])
    with pytest.raises(ValueError, match="trained_group_sizes"):
        resolve_trained_group_sizes([5, 1, 1, 1], [4, 4, 4, 4])
    with pytest.raises(ValueError, match="trained_group_sizes"):
        resolve_trained_group_sizes(6, [4, 4, 4, 4])
    with pytest.raises(ValueError, match="trained_group_sizes"):
        resolve_trained_group_sizes(32, [4, 4, 4, 4])
    with pytest.raises(ValueError, match="usage_counts"):
        analyze_codebook(q, usage_counts=torch.zeros(15), figures=False)
    with pytest.raises(ValueError, match="heatmap_codes_per_group"):
        analyze_codebook(q, heatmap_codes_per_group=0, figures=False)
    with pytest.raises(ValueError, match="scatter_codes_per_group"):
        analyze_codebook(q, scatter_codes_per_group=-1, figures=False)
    with pytest.raises(ValueError, match="model"):
        analyze_codebook(torch.nn.Linear(2, 2), figures=False)
    with pytest.raises(ValueError, match="name"):
        analyze_codebook(q, heatmap_codes_per_group=2).png("nope")


@pytest.mark.parametrize("num_groups", [1, 16])
def test_simvq_and_vanilla_vq_extremes(num_groups):
    """k = 1 has no between-group pairs, k = n no within-group pairs: those statistics are None, not NaN."""
    q = GroupVectorQuantizer(16, 4, num_groups=num_groups)
    analysis = analyze_codebook(q, usage_counts=torch.arange(16), heatmap_codes_per_group=4, scatter_codes_per_group=2)
    cos = analysis.stats["cosine_similarity"]
    if num_groups == 1:
        assert cos["between_group_mean"] is None and cos["within_group_mean"] is not None
    else:
        assert cos["within_group_mean"] is None and cos["group_pair_mean"][0][0] is None
        assert analysis.stats["norm"]["var"] == [0.0] * 16
    json.dumps(analysis.stats, allow_nan=False)
    assert all(analysis.png(name, dpi=30)[:8] == PNG_SIGNATURE for name in analysis.figures)


def test_trained_group_sizes_from_config_and_wrapped_models():
    from types import SimpleNamespace

    q = GroupVectorQuantizer(16, 4, num_groups=2)
    q.resize_codebook(32, mode="extend", seed=0)
    model = SimpleNamespace(quantizer=q, config=SimpleNamespace(trained_group_sizes=[8, 8]))
    stats = analyze_codebook(model, figures=False).stats
    assert stats["trained_group_sizes"] == [8, 8]
    codebook = q.codebook().detach()
    assert stats["norm"]["new_mean"][1] == pytest.approx(codebook[24:32].norm(dim=1).mean().item(), rel=1e-6)
    # An explicit argument wins over the config; a DDP-style wrapper (`.module`) is unwrapped.
    wrapped = SimpleNamespace(module=model)
    assert analyze_codebook(wrapped, trained_group_sizes=[4, 16], figures=False).stats["trained_group_sizes"] == [4, 16]
