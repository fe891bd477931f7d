"""Incremental PCA and EVA's rank redistribution against values computed independently."""
import pytest
import torch
from peft.utils.incremental_pca import IncrementalPCA as PeftIncrementalPCA

from lorakit.init.eva import rank_distribution
from lorakit.init.ipca import IncrementalPCA


def _batches(seed=0, n=3, rows=40, dim=12, rank=None):
    g = torch.Generator().manual_seed(seed)
    if rank is None:
        data = torch.randn(n * rows, dim, generator=g, dtype=torch.float64) * torch.linspace(3, 0.5, dim, dtype=torch.float64)
    else:  # exactly `rank` directions around a mean: a k-component incremental SVD loses nothing
        data = torch.randn(n * rows, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, dim, generator=g, dtype=torch.float64)
    data = data + torch.linspace(-2, 5, dim, dtype=torch.float64)
    return data, list(data.split(rows))


def _sign_fixed(vh):
    return vh * torch.sign(vh.gather(1, vh.abs().argmax(dim=1, keepdim=True)))


def test_incremental_pca_of_exact_rank_data_is_the_full_svd():
    data, batches = _batches(rank=3)
    pca = IncrementalPCA(3)
    for b in batches:
        pca.partial_fit(b)
    centred = data - data.mean(dim=0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    assert pca.n_seen == data.shape[0]
    torch.testing.assert_close(pca.mean, data.mean(dim=0))
    torch.testing.assert_close(pca.m2, centred.square().sum(dim=0))
    torch.testing.assert_close(pca.components, _sign_fixed(vh[:3]))
    torch.testing.assert_close(pca.singular_values, s[:3])
    torch.testing.assert_close(pca.explained_variance_ratio, s[:3].square() / centred.square().sum())


def test_incremental_pca_matches_peft_lowrank_step_by_step():
    """PEFT's IncrementalPCA with svd_lowrank (q = 2k, 4 iterations, seed 42) on full-rank data, after every batch."""
    _, batches = _batches(seed=1, n=4)
    ours, theirs = IncrementalPCA(4), PeftIncrementalPCA(n_components=4, lowrank=True, lowrank_seed=42)
    for b in batches:
        ours.partial_fit(b)
        theirs.partial_fit(b)
        torch.testing.assert_close(ours.mean, theirs.mean_)
        torch.testing.assert_close(ours.components, theirs.components_)
        torch.testing.assert_close(ours.singular_values, theirs.singular_values_)
        torch.testing.assert_close(ours.explained_variance_ratio, theirs.explained_variance_ratio_)


def test_rank_distribution_takes_the_budget_largest_ratios():
    ratios = {"a": torch.tensor([0.5, 0.2, 0.01, 0.001]), "b": torch.tensor([0.3, 0.25, 0.1, 0.05])}
    rep = {"a": "a", "b": "b"}
    assert rank_distribution(ratios, rep, {"a": 4, "b": 4}, 4) == {"a": 2, "b": 2}
    assert rank_distribution(ratios, rep, {"a": 4, "b": 4}, 5) == {"a": 2, "b": 3}
    # a layer's candidates stop at its max_components
    assert rank_distribution(ratios, rep, {"a": 1, "b": 4}, 4) == {"a": 1, "b": 3}


def test_rank_distribution_gives_a_group_representative_the_larger_count():
    ratios = {"q": torch.tensor([0.4, 0.3, 0.2]), "o": torch.tensor([0.35, 0.01, 0.001])}
    rep = {"q": "q", "k": "q", "o": "o"}
    counts = rank_distribution(ratios, rep, {"q": 3, "k": 3, "o": 3}, 4)
    assert counts == {"q": 2, "k": 1, "o": 1}  # 0.4 twice (q and k share q's SVD), 0.35 (o), 0.3 (tie: q's or k's)


class _Tokens(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(50, 16)
        self.lin = torch.nn.Linear(16, 16)
        self.out = torch.nn.Linear(16, 8)

    def forward(self, input_ids):
        return self.out(self.lin(self.emb(input_ids)))


def _eva_a(batches):
    import lorakit

    model = lorakit.apply(_Tokens(), lorakit.LoRAConfig(r=2, target_modules=["lin", "out"], init_lora_weights="eva"))
    model = lorakit.initialize(model, batches, forward_fn=lambda m, b: m(b["input_ids"]))
    return {p: t["lora_A.weight"] for p, t in lorakit.AdapterState.from_model(model).tensors.items()}


def test_eva_label_mask_drops_the_same_tokens_as_the_attention_mask():
    """labels == -100 (EvaConfig's default label mask) leaves out exactly the tokens attention_mask = 0 would."""
    g = torch.Generator().manual_seed(3)
    labelled, padded = [], []
    for _ in range(4):
        ids = torch.randint(0, 50, (4, 12), generator=g)
        drop = torch.rand(4, 12, generator=g) < 0.3
        labelled.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.masked_fill(drop, -100)})
        padded.append({"input_ids": ids, "attention_mask": (~drop).long(), "labels": ids})
    masked, reference = _eva_a(labelled), _eva_a(padded)
    assert masked.keys() == reference.keys() and masked
    for key in masked:
        torch.testing.assert_close(masked[key], reference[key])
