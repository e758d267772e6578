"""GroupVectorQuantizer: codebook generation (Eq. 7), search (Eq. 1), STE and loss (Eq. 2-3), group
independence (Eq. 5), usage statistics, and resize without training (Algorithm 2)."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import ReadBacks
from groupvq_hf import GroupVectorQuantizer
from groupvq_hf.quantizer import nearest_code_indices, split_codebook_size, usage_statistics


def make(**kwargs):
    torch.manual_seed(0)
    defaults = dict(codebook_size=64, codebook_dim=8, num_groups=4, codebook_rank=6)
    return GroupVectorQuantizer(**{**defaults, **kwargs})


def latents(b=2, c=8, h=4, w=4, seed=1):
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def test_forward_matches_diffusers_vector_quantizer_interface():
    q = make()
    z = latents()
    z_q, loss, (perplexity, none, indices) = q(z)
    assert z_q.shape == z.shape and loss.ndim == 0 and none is None
    assert indices.shape == (2, 4, 4) and indices.dtype == torch.long
    codes = q.codebook()
    expected = codes[indices].permute(0, 3, 1, 2)
    torch.testing.assert_close(z_q, expected)
    assert 1.0 <= perplexity.item() <= 64
    entry = q.get_codebook_entry(indices.flatten(), (2, 4, 4, 8))
    torch.testing.assert_close(entry, expected)


def test_parameters_are_projectors_and_bias_cores_are_frozen_buffers():
    q = make()
    assert {n for n, _ in q.named_parameters()} == {"weight", "bias"}
    assert q.core.shape == (4, 16, 6) and not q.core.requires_grad
    assert "core" in q.state_dict()
    assert q.weight.shape == (4, 6, 8) and torch.count_nonzero(q.bias) == 0
    # Eq. 7 per group, concatenated in order (Algorithm 1 line 7); each group has its own core.
    codes = q.codebook()
    for j, (start, end) in enumerate(zip(q.group_offsets[:-1], q.group_offsets[1:])):
        torch.testing.assert_close(codes[start:end], q.core[j] @ q.weight[j] + q.bias[j])
    assert not torch.equal(q.core[0], q.core[1])


def test_straight_through_and_loss_terms():
    q = make(commitment_beta=0.25)
    z = latents().requires_grad_(True)
    z_q, loss, (_, _, indices) = q(z)
    target = q.codebook()[indices].permute(0, 3, 1, 2)
    torch.testing.assert_close(loss, 1.25 * F.mse_loss(z, target))
    # Eq. 2: gradient of z_q w.r.t. z is the identity.
    g = torch.randn_like(z)
    (grad_z,) = torch.autograd.grad((z_q * g).sum(), z, retain_graph=True)
    torch.testing.assert_close(grad_z, g)
    # beta term reaches the encoder only, the codebook term reaches the codes only.
    (grad_z,) = torch.autograd.grad(loss, z, retain_graph=True)
    torch.testing.assert_close(grad_z, 0.25 * 2 * (z - target).detach() / z.numel())
    grad_w, grad_b = torch.autograd.grad(loss, [q.weight, q.bias])
    assert grad_w.abs().sum() > 0 and grad_b.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs",
    [{}, dict(group_sizes=[16, 16, 16, 16], group_ranks=[6, 4, 5, 3]), dict(projector="linear+mlp")],
    ids=["uniform", "heterogeneous", "linear+mlp"],
)
def test_group_loss_updates_only_that_group_and_never_a_core(kwargs):
    """Eq. 5: a loss on the codes of group j moves only group j's codes after an optimizer step."""
    q = make(**kwargs)
    before, cores = q.codebook().detach().clone(), [c.clone() for c in q.cores()]
    # Features sitting on group 2's codes are quantised to group 2 only.
    start, end = q.group_offsets[2], q.group_offsets[3]
    z = before[start:end].view(1, 4, 4, 8).permute(0, 3, 1, 2) + 0.01
    optimizer = torch.optim.Adam(q.parameters(), lr=1e-2)
    _, loss, (_, _, indices) = q(z)
    assert ((indices >= start) & (indices < end)).all()
    loss.backward()
    for j in range(4):  # every per-group slice of every parameter
        touched = sum(
            (p.grad[j] if p.shape[0] == 4 and not name[-1].isdigit() else p.grad * (int(name[-1]) == j)).abs().sum()
            for name, p in q.named_parameters()
        )
        assert (touched > 0) == (j == 2), (j, touched)
    optimizer.step()
    after = q.codebook().detach()
    assert torch.equal(after[:start], before[:start]) and torch.equal(after[end:], before[end:])
    assert not torch.allclose(after[start:end], before[start:end])
    assert all(torch.equal(a, b) for a, b in zip(q.cores(), cores))


@pytest.mark.parametrize("num_groups", [1, 16])
def test_simvq_and_vanilla_vq_extremes(num_groups):
    q = make(codebook_size=16, num_groups=num_groups, codebook_rank=4)
    assert q.num_groups == num_groups and q.codebook().shape == (16, 8)
    z = latents()
    _, loss, (_, _, indices) = q(z)
    loss.backward()
    used_groups = set(q.group_of(indices.flatten()).tolist())
    grad_per_group = q.weight.grad.abs().sum(dim=(1, 2)) + q.bias.grad.abs().sum(1)
    assert {j for j in range(num_groups) if grad_per_group[j] > 0} == used_groups


@pytest.mark.parametrize("projector", ["mlp", "linear+mlp"])
def test_mlp_projectors_train_and_resize(projector):
    q = make(projector=projector)
    names = {n for n, _ in q.named_parameters()}
    assert {"mlp_in_weight", "mlp_in_bias", "mlp_out_weight", "bias"} <= names
    assert ("weight" in names) == (projector == "linear+mlp")
    _, loss, _ = q(latents())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in q.parameters())
    old = q.codebook().detach().view(4, 16, 8)
    q.resize_codebook(128, mode="extend", seed=0)
    torch.testing.assert_close(q.codebook().detach().view(4, 32, 8)[:, :16], old, rtol=1e-5, atol=1e-6)


def test_heterogeneous_groups_and_proportional_resize():
    torch.manual_seed(0)
    q = GroupVectorQuantizer(32, 8, group_sizes=[8, 16, 8], group_ranks=[2, 4, 3])
    assert not q.uniform and q.group_sizes == [8, 16, 8] and q.group_ranks == [2, 4, 3]
    assert q.group_offsets == [0, 8, 24, 32] and q.codebook().shape == (32, 8)
    _, loss, (_, _, indices) = q(latents())
    assert indices.max() < 32
    old_cores, old_codes = [c.clone() for c in q.cores()], q.codebook().detach().clone()
    assert q.resize_codebook(64, mode="extend", seed=3) == [16, 32, 16]
    new_codes = q.codebook().detach()
    for j, (old_core, core) in enumerate(zip(old_cores, q.cores())):
        assert core.shape == (2 * old_core.shape[0], old_core.shape[1])
        assert torch.equal(core[: old_core.shape[0]], old_core)
        start, new_start = [0, 8, 24][j], [0, 16, 48][j]
        n = old_core.shape[0]
        torch.testing.assert_close(new_codes[new_start : new_start + n], old_codes[start : start + n])
    assert q.resize_codebook([4, 4, 4], mode="resample", seed=0) == [4, 4, 4]
    assert q.codebook().shape == (12, 8) and q.group_ranks == [2, 4, 3]


def test_extend_keeps_cores_bit_for_bit_and_codes_to_tolerance():
    q = make()
    old_core, old_codes = q.core.clone(), q.codebook().detach().clone()
    weight = q.weight.detach().clone()
    assert q.resize_codebook(256, mode="extend", seed=0) == [64] * 4
    assert q.uniform and q.core.shape == (4, 64, 6)
    assert torch.equal(q.core[:, :16], old_core)
    assert torch.equal(q.weight.detach(), weight)
    torch.testing.assert_close(q.codebook().detach().view(4, 64, 8)[:, :16], old_codes.view(4, 16, 8))


@pytest.mark.parametrize("new_size", [16, 32, 128, 1024])
def test_resample_down_and_up_gives_requested_sizes(new_size):
    q = make()
    assert q.resize_codebook(new_size, mode="resample", seed=1) == [new_size // 4] * 4
    assert q.codebook().shape == (new_size, 8) and q.codebook_size == new_size
    z_q, _, (_, _, indices) = q(latents())
    assert indices.max() < new_size


def test_resize_takes_numpy_and_tensor_sizes_and_keeps_frozen_projectors_frozen():
    import numpy as np

    q = make()
    assert q.resize_codebook(np.int64(128), "extend", seed=0) == [32] * 4
    assert q.resize_codebook(torch.tensor(256), "extend", seed=0) == [64] * 4
    assert q.resize_codebook(np.array([64, 64, 64, 128]), "extend", seed=0) == [64, 64, 64, 128]
    q.requires_grad_(False)
    q.resize_codebook([128] * 4, "resample", seed=0)
    assert not any(p.requires_grad for p in q.parameters())


def test_seeded_resizes_are_reproducible():
    a, b = make(), make()
    a.resize_codebook(128, "resample", seed=7)
    b.resize_codebook(128, "resample", seed=7)
    assert torch.equal(a.core, b.core)
    c = make()
    c.resize_codebook(128, "resample", seed=8)
    assert not torch.equal(a.core, c.core)


def test_resize_to_non_uniform_list_switches_layout_and_back():
    q = make()
    q.resize_codebook([16, 32, 16, 16], mode="extend", seed=0)
    assert not q.uniform and q.group_sizes == [16, 32, 16, 16]
    assert {n for n, _ in q.named_parameters()} == {"bias", "weight_0", "weight_1", "weight_2", "weight_3"}
    q.resize_codebook([32, 32, 32, 32], mode="extend", seed=0)
    assert q.uniform and {n for n, _ in q.named_parameters()} == {"bias", "weight"}


@pytest.mark.parametrize("block", [1 << 12, 1 << 14, 1 << 16, 1 << 21, 1 << 30])
def test_chunked_search_equals_unchunked_reference(block):
    gen = torch.Generator().manual_seed(0)
    z, codebook = torch.randn(700, 16, generator=gen), torch.randn(3000, 16, generator=gen)
    reference = torch.cdist(z.double(), codebook.double()).argmin(1)
    assert torch.equal(nearest_code_indices(z, codebook, max_block_elements=block), reference)


def test_search_ties_go_to_lowest_index_in_every_chunking():
    codebook = torch.zeros(50, 4)
    codebook[10:] = 5.0
    z = torch.zeros(9, 4)
    for block in (3, 16, 1 << 20):
        assert nearest_code_indices(z, codebook, max_block_elements=block).tolist() == [0] * 9


def test_search_stays_fp32_under_bf16_autocast():
    q = make(codebook_size=256, num_groups=4, codebook_dim=32, codebook_rank=32)
    z = latents(c=32, h=8, w=8)
    _, _, (_, _, reference) = q(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_q, loss, (_, _, indices) = q(z.bfloat16())
    assert loss.dtype == torch.float32 and z_q.dtype == torch.bfloat16
    # Only the bf16 rounding of the input may move a choice, never the codebook or distance precision.
    _, _, (_, _, expected) = q(z.bfloat16().float())
    assert torch.equal(indices, expected)
    assert (indices == reference).float().mean() > 0.9


def test_usage_counts_reset_and_per_group():
    q = make()
    codes = q.codebook().detach()
    chosen = torch.tensor([0, 1, 1, 17, 40, 40, 40, 63])
    z = codes[chosen].view(1, 2, 4, 8).permute(0, 3, 1, 2)
    q(z)
    assert q.usage_counts().sum() == 0  # counting is explicit: none outside counting_usage()
    with q.counting_usage():
        q(z)
    counts = q.usage_counts()
    assert counts.sum() == 8 and counts[40] == 3 and counts[1] == 2
    assert q.codebook_usage() == pytest.approx(5 / 64)
    assert q.group_usage() == pytest.approx([2 / 16, 1 / 16, 1 / 16, 1 / 16])
    assert q.group_frequency() == pytest.approx([3 / 8, 1 / 8, 3 / 8, 1 / 8])
    q.reset_usage()
    assert q.usage_counts().sum() == 0 and q.codebook_usage() == 0.0
    q.track_usage = False
    q(z)
    assert q.usage_counts().sum() == 0


def test_usage_is_counted_inside_counting_usage_or_when_asked_only():
    q = make()
    codes = q.codebook().detach()
    z = codes[torch.tensor([0, 1, 1, 17, 40, 40, 40, 63])].view(1, 2, 4, 8).permute(0, 3, 1, 2)
    assert q.track_usage is False and not q.counts_usage  # default: no forward counts, training or not
    q(z)
    q.eval()(z)
    assert q.usage_counts().sum() == 0 and not q.counts_usage
    with q.counting_usage() as same:
        assert same is q and q.track_usage is True
        q(z)
    assert q.track_usage is False and q.usage_counts().sum() == 8
    q.track_usage = None  # None: training-mode forwards count, inference never
    assert not q.counts_usage and q.train().counts_usage
    with pytest.raises(RuntimeError), q.counting_usage(False):
        q(z)
        raise RuntimeError("inside")
    assert q.track_usage is None and q.usage_counts().sum() == 8  # paused inside, restored after an error
    stats = q.usage_statistics()
    assert stats == usage_statistics(q.usage_counts(), q.group_sizes)
    assert stats["codebook_usage"] == 5 / 64 and stats["num_tokens"] == 8
    assert stats["group_usage"] == [2 / 16, 1 / 16, 1 / 16, 1 / 16] and stats["group_frequency"] == [3 / 8, 1 / 8, 3 / 8, 1 / 8]
    assert stats["perplexity"] == pytest.approx(math.exp(-sum(p * math.log(p) for p in (1 / 8, 2 / 8, 1 / 8, 3 / 8, 1 / 8))))


def test_usage_statistics_of_parts_and_empty_counts():
    counts = torch.tensor([2, 0, 0, 1])
    part = usage_statistics(counts[:1], [1, 0], num_tokens=3)  # group 1 holds no code of this part
    assert part["group_usage"] == [1.0, None] and part["group_frequency"] == [2 / 3, 0.0] and part["num_tokens"] == 3
    empty = usage_statistics(torch.zeros(4, dtype=torch.long), [2, 2])
    assert empty["codebook_usage"] == 0.0 and math.isnan(empty["perplexity"]) and empty["group_frequency"] == [0.0, 0.0]
    from groupvq_hf.evaluation import metrics

    assert metrics.usage_statistics is usage_statistics  # one implementation: the CodebookUsage metric uses it


def test_code_counts_and_perplexity_equal_bincount_and_the_entropy_of_the_hit_codes():
    from groupvq_hf.quantizer import code_counts, code_perplexity

    indices = torch.randint(0, 50, (3, 7, 5), generator=torch.Generator().manual_seed(0))
    counts = code_counts(indices, 64)
    assert counts.dtype == torch.long and torch.equal(counts, torch.bincount(indices.flatten(), minlength=64))
    p = counts[counts > 0].double() / counts.sum()
    assert code_perplexity(counts).item() == pytest.approx((-(p * p.log()).sum()).exp().item(), rel=1e-14)
    assert code_perplexity(torch.tensor([0, 4, 0])).item() == 1.0  # one code hit
    assert math.isnan(code_perplexity(torch.zeros(5, dtype=torch.long)).item())  # nothing hit


def test_forward_reads_nothing_back_from_the_device_with_the_finiteness_check_off():
    """The quantizer's forward (indices, loss, perplexity, usage counting) stays asynchronous on a GPU, so a loop can
    queue the next batch while this one runs; only the NaN/inf check reads a value back."""
    q = make()
    z = latents()
    with ReadBacks() as checked:
        q(z)
    assert checked.ops  # the finiteness check: one value read back
    q.check_finite = False
    with ReadBacks() as unchecked, q.counting_usage():
        q(z)
    assert unchecked.ops == []
    assert q.usage_counts().sum() == z.numel() // z.shape[1]


def _usage_worker(rank, world_size, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    q = make()
    codes = q.codebook().detach()
    z = codes[torch.tensor([rank, 16 + rank])].view(1, 1, 2, 8).permute(0, 3, 1, 2)
    with q.counting_usage():
        q(z)
    # Every rank takes part in each all_reduce.
    results = (q.usage_counts(sync=True), q.usage_counts(sync=False), q.group_usage(sync=True))
    if rank == 0:  # no collective by default: one rank alone may read its own counters
        results += (q.usage_counts(), q.usage_statistics()["group_usage"])
    results += (q.usage_statistics(sync=True)["group_usage"],)
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def test_usage_counts_sum_across_processes(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "counts.pt"
    mp.spawn(_usage_worker, args=(2, port, str(out)), nprocs=2, join=True)
    synced, local, group_usage, default_counts, default_group_usage, synced_group_usage = torch.load(out)
    assert synced[[0, 1, 16, 17]].tolist() == [1, 1, 1, 1] and synced.sum() == 4
    assert local.sum() == 2
    assert group_usage == pytest.approx([2 / 16, 2 / 16, 0, 0])
    assert torch.equal(default_counts, local) and default_group_usage == [1 / 16, 1 / 16, 0, 0]
    assert synced_group_usage == group_usage


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(codebook_size=60, num_groups=8), "`codebook_size`=60 is not divisible by `num_groups`=8"),
        (dict(codebook_size=64, group_sizes=[32, 16]), "`group_sizes` must sum to `codebook_size`=64"),
        (dict(codebook_size=64, group_sizes=[32, 32], group_ranks=[4]), "`group_ranks` has 1 entries but there are 2"),
        (dict(codebook_size=64, projector="conv"), "`projector` must be one of"),
        (dict(codebook_size=0), "`codebook_size` must be a positive int"),
        (dict(codebook_size=64, codebook_rank=0), "`codebook_rank` must be a positive int"),
    ],
)
def test_bad_construction_raises_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GroupVectorQuantizer(codebook_dim=8, **kwargs)


def test_bad_resize_and_lookup_raise_value_error():
    q = make()
    with pytest.raises(ValueError, match=r"`new_size`=30 does not split .* multiples of 4"):
        q.resize_codebook(30)
    with pytest.raises(ValueError, match="`mode` must be one of"):
        q.resize_codebook(128, mode="grow")
    with pytest.raises(ValueError, match="no group may shrink"):
        q.resize_codebook(32, mode="extend")
    with pytest.raises(ValueError, match="`new_size` as a list needs 4"):
        q.resize_codebook([16, 16])
    with pytest.raises(ValueError, match=r"`indices` must lie in \[0, 63\]"):
        q.get_codebook_entry(torch.tensor([64]))
    with pytest.raises(ValueError, match="integer tensor"):
        q.get_codebook_entry(torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"`z` must have shape \(batch, 8, height, width\)"):
        q(torch.randn(1, 5, 4, 4))
    with pytest.raises(ValueError, match=r"`shape` must be \(batch, height, width, 8\)"):
        q.get_codebook_entry(torch.zeros(2, 4, 4, dtype=torch.long), (2, 4, 4, 5))
    with pytest.raises(ValueError, match="`new_size` must be an int or a list of 4 ints"):
        q.resize_codebook(128.0)
    assert q.codebook_size == 64  # failed resizes changed nothing


def test_split_codebook_size_names_valid_sizes_for_heterogeneous_groups():
    assert split_codebook_size(64, [8, 16, 8]) == [16, 32, 16]
    with pytest.raises(ValueError, match="multiples of 4"):
        split_codebook_size(10, [8, 16, 8])


def test_search_memory_is_one_block_whatever_the_number_of_codes():
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(0)
    z, block = torch.randn(256, 8, generator=gen), 1 << 14
    largest = {}
    for n_codes in (1 << 11, 1 << 15):
        codebook = torch.randn(n_codes, 8, generator=gen)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            indices = nearest_code_indices(z, codebook, max_block_elements=block)
        assert torch.equal(indices, torch.cdist(z.double(), codebook.double()).argmin(1))
        largest[n_codes] = max(e.self_cpu_memory_usage for e in prof.events())
    # The largest allocation is one distance block (`block` floats), whatever the number of codes:
    # never tokens x codes floats (32 MiB here), never one float per code.
    assert 0 < largest[1 << 15] <= 4 * block and largest[1 << 15] == largest[1 << 11], largest
