"""Retrieval: MiniLM description search (and its cache), and AutoLoRA's weight encoder finding undescribed adapters."""
from __future__ import annotations

import pytest
import torch
from library_helpers import CONCEPTS, TASKS, Net, pair_adapter, save_adapter, task_adapter

from lorakit.library import EncoderConfig, Library, LibraryError, text
from lorakit import load_state
from lorakit.library.retrieval import weight_embeddings
from lorakit.library.weights import PROBES, factors, stack, train_encoder

DESCRIBED = {
    "sentiment": ("Sentiment of movie reviews: positive or negative.", "was the film review favourable"),
    "spam": ("Detect spam in e-mail messages.", "junk mail filter"),
    "code": ("Complete Python source code.", "write a python function"),
    "chem": ("Predict the solubility of chemical compounds.", "molecules dissolving in water"),
}
RECALL_AT_1 = 0.5  # fixed before the run; chance is 1/6 (six undescribed adapters, one per task)


def test_embeddings_equal_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    from lorakit.zoo import minilm_dir

    texts = ["Detect spam in e-mail messages.", "a much longer sentence " * 30]  # the second is truncated at 256 tokens
    expected = st.SentenceTransformer(str(minilm_dir()), device="cpu").encode(texts, normalize_embeddings=True)
    torch.testing.assert_close(text.embed(texts), torch.from_numpy(expected), atol=1e-5, rtol=1e-4)


@pytest.fixture
def described(tmp_path):
    lib = Library(tmp_path / "lib")
    for i, (name, (description, _)) in enumerate(DESCRIBED.items()):
        lib.add(save_adapter(tmp_path / name, seed=i), name=name, description=description)
    lib.add(save_adapter(tmp_path / "bare", seed=9), name="bare")  # no description: not ranked by description
    return lib


def test_description_search_ranks_the_right_entry_first(described):
    for name, (_, query) in DESCRIBED.items():
        hits = described.search(query, k=3)
        assert hits[0][0].name == name, (query, [(e.name, round(s, 3)) for e, s in hits])
        assert len(hits) == 3 and hits[0][1] > hits[1][1] >= hits[2][1]
    assert "bare" not in [e.name for e, _ in described.search("anything", k=10)]


def test_the_cache_follows_changes_to_an_entry(described, tmp_path):
    described.search("junk mail filter")
    assert (described.root / text.CACHE).is_file()
    described.add(tmp_path / "spam", name="spam", description="Complete Python source code for data science.",
                  overwrite=True)
    hits = described.search("junk mail filter", k=2)
    assert hits[0][0].name != "spam"  # an embedding cached by entry name would still find the old description
    assert described.search("python code for data science", k=1)[0][0].name == "spam"


def _task_library(tmp_path, held_out_seed=3, input_side=True):
    """Three described adapters per task, and one per task with its description removed."""
    lib = Library(tmp_path / "lib")
    for t, description in enumerate(TASKS):
        for seed in range(4):
            path = task_adapter(tmp_path / "src" / f"t{t}s{seed}", t, seed, input_side=input_side)
            lib.add(path, name=f"t{t}-s{seed}", description="" if seed == held_out_seed else description)
    return lib


def _recall_at_1(lib, config: EncoderConfig) -> float:
    hits = 0
    for t, description in enumerate(TASKS):
        ranked = [e.name for e, _ in lib.search(description, k=len(TASKS) * 4, by="weights", config=config)]
        hits += [n for n in ranked if n.endswith("-s3")][0] == f"t{t}-s3"
    return hits / len(TASKS)


def test_weight_search_finds_undescribed_adapters_by_their_task_text(tmp_path):
    assert _recall_at_1(_task_library(tmp_path), EncoderConfig()) >= RECALL_AT_1


def test_the_gram_probe_finds_tasks_that_live_only_in_b(tmp_path):
    # A random per adapter (LoRA's initialisation, barely trained): only the output side tells tasks apart, which
    # the Gram probe reads (1.0 measured); a Gram probe reading the input side (ΔWᵀ) measured 0.17, chance
    assert _recall_at_1(_task_library(tmp_path, input_side=False), EncoderConfig(probe="gram")) >= RECALL_AT_1


def test_the_weight_encoder_is_deterministic_and_cached(tmp_path):
    lib = _task_library(tmp_path)
    entries = lib.list()
    config = EncoderConfig(probe="input", steps=40)
    first = weight_embeddings(lib, entries, config)
    cached = list((lib.root / ".cache").glob("weights-*.safetensors"))
    assert len(cached) == 1
    cached[0].unlink()
    assert torch.equal(weight_embeddings(lib, entries, config), first)  # retrained from the same seed
    other = weight_embeddings(lib, entries, EncoderConfig(probe="input", steps=40, seed=1))
    assert not torch.allclose(other, first)
    neighbours = weight_embeddings(lib, entries)
    (lib.root / ".cache" / cached[0].name).unlink()
    assert torch.equal(weight_embeddings(lib, entries), neighbours)  # no random draw at all


@pytest.mark.parametrize("probe", PROBES)
def test_every_weight_encoder_sees_delta_w_only(tmp_path, probe):
    # LoRA's gauge: B A = (B R)(R⁻¹ A) for any invertible R; the embedding must not move
    batch = [factors(load_state(task_adapter(tmp_path / f"t{t}", t, 0)), f"t{t}") for t in range(4)]
    encoder = train_encoder(batch, text.embed(list(TASKS[:4])), EncoderConfig(probe=probe, steps=5))
    g = torch.Generator().manual_seed(0)
    turned = []
    for f in batch:
        r = {p: torch.randn(a.shape[0], a.shape[0], generator=g, dtype=torch.float64) + 3 * torch.eye(a.shape[0])
             for p, (a, _) in f.items()}
        turned.append({p: ((torch.linalg.inv(r[p]) @ a.double()).float(), (b.double() @ r[p]).float())
                       for p, (a, b) in f.items()})
    with torch.no_grad():
        torch.testing.assert_close(encoder(stack(turned, encoder.shapes)), encoder(stack(batch, encoder.shapes)),
                                   atol=2e-4, rtol=1e-3)


UNSEEN_RECALL_AT_1 = 0.6  # fixed before the run; chance is 1/5 (five undescribed adapters of unseen tasks)


def test_weight_search_finds_adapters_of_tasks_no_entry_describes(tmp_path):
    # Ten described tasks "X or Y?" over six concepts; five others are held out, each sharing its concepts with
    # described ones. Only adapters' weights say which held-out adapter is which.
    pairs = [(a, b) for a in range(len(CONCEPTS)) for b in range(a + 1, len(CONCEPTS))]
    held = [(0, 1), (2, 3), (4, 5), (0, 2), (3, 5)]
    describe = lambda a, b: f"Is this text about {CONCEPTS[a]} or about {CONCEPTS[b]}?"  # noqa: E731
    lib = Library(tmp_path / "lib")
    for a, b in pairs:
        for seed in (0, 1):
            if (a, b) in held and seed:
                continue
            path = pair_adapter(tmp_path / "src" / f"{a}{b}s{seed}", a, b, seed)
            lib.add(path, name=f"p{a}{b}-s{seed}", description="" if (a, b) in held else describe(a, b))
    hits = 0
    for a, b in held:
        ranked = [e.name for e, _ in lib.search(describe(a, b), k=40, by="weights")]
        hits += [n for n in ranked if tuple(map(int, n[1:3])) in held][0] == f"p{a}{b}-s0"
    assert hits / len(held) >= UNSEEN_RECALL_AT_1


def test_weight_search_needs_one_base_and_two_descriptions(tmp_path):
    lib = Library(tmp_path / "lib")
    lib.add(save_adapter(tmp_path / "a", seed=1), name="a", description="one task")
    lib.add(save_adapter(tmp_path / "b", seed=2), name="b")
    with pytest.raises(ValueError, match="at least two different descriptions"):
        lib.search("x", by="weights")
    lib.add(task_adapter(tmp_path / "t", 0, 0), name="t", description="another base")
    with pytest.raises(LibraryError, match="adapters for 2 base models.*fingerprint="):
        lib.search("x", by="weights")
    with pytest.raises(LibraryError, match="search by 'names'"):
        lib.search("x", by="names")
    assert lib.search("x", by="weights", fingerprint="0" * 16) == []
    assert [e.name for e, _ in lib.search("x", by="description", base=Net())] == ["a"]
