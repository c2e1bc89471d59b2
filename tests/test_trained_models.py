"""The trained pair shipped in neox_jax/models (docs/training.md): within the size budget, read by
transformers as neox_jax reads them, and a real distribution: held-out prose is predicted far better than by
token frequencies, and int8 weights keep the fp32 model's choices."""

import json

import numpy as np
import pytest

import neox_jax
from neox_jax.demo import DRAFT, MODELS, PROMPTS, TARGET, demo_model, trained_tokenizer

# Two paragraphs of held-out pages (library/pathlib.html, library/re.html; never trained on; PSF License v2).
# One paragraph's perplexity varies by 4x from page to page (names, numbers); the split-wide figures are in
# docs/figures/trained.md. These two sit near the split's median.
HELD_OUT = ("Rename this file or directory to the given target, and return a new Path instance pointing to target. "
            "On Unix, if target exists and is a file, it will be replaced silently if the user has permission. On "
            "Windows, if target exists, FileExistsError will be raised.\n"
            "Both patterns and strings to be searched can be Unicode strings (str) as well as 8-bit strings (bytes). "
            "However, Unicode strings and 8-bit strings cannot be mixed: that is, you cannot match a Unicode string "
            "with a byte pattern or vice-versa; similarly, when asking for a substitution, the replacement string "
            "must be of the same type as both the pattern and the search string.")
UNIGRAM_PERPLEXITY = 1034.8  # on the held-out windows of docs/figures/trained.md


@pytest.fixture(scope="module")
def target():
    if trained_tokenizer() is None:
        pytest.skip("the GPT-NeoX-20B tokenizer is not found (set NEOX_TOKENIZER)")
    return demo_model()


def nll(model, ids) -> np.ndarray:
    logits = model.logits(np.asarray([ids[:-1]])).astype(np.float64)[0]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return -logp[np.arange(len(ids) - 1), ids[1:]]


def test_the_pair_fits_the_budget_and_shares_one_tokenizer():
    sizes = [sum(f.stat().st_size for f in d.glob("*.safetensors")) for d in (TARGET, DRAFT)]
    assert sum(sizes) <= 30e6
    configs = [json.loads((d / "config.json").read_text()) for d in (TARGET, DRAFT)]
    assert all(c["tie_word_embeddings"] and c["vocab_size"] == 50304 and c["torch_dtype"] == "float16"
               for c in configs)
    assert not list(MODELS.rglob("*tokenizer*"))  # the 20B tokenizer is found, not shipped (neox_jax.demo)


def test_held_out_prose_beats_half_the_unigram_perplexity(target):
    ids = target.tokenizer.encode(HELD_OUT)
    target_ppl = float(np.exp(nll(target, ids).mean()))
    assert target_ppl < UNIGRAM_PERPLEXITY / 2, target_ppl
    draft = neox_jax.load(DRAFT, "float32", progress=False, tokenizer=trained_tokenizer())
    assert float(np.exp(nll(draft, ids).mean())) < UNIGRAM_PERPLEXITY


def test_transformers_reads_the_shipped_target_as_neox_jax_does(target):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ids = np.asarray([target.tokenizer.encode(HELD_OUT)[:64]])
    reference = transformers.GPTNeoXForCausalLM.from_pretrained(TARGET, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(target.logits(ids)[..., :expected.shape[-1]], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode, bound", [("int8", 0.98), ("fp8", 0.97), ("int8-dynamic", 0.98)])
def test_quantized_weights_keep_the_models_choices_on_held_out_text(target, mode, bound):
    """docs/figures/trained.md, over 24,576 held-out positions: int8 99.9%, fp8 99.7%; one flip here is 0.7%.
    int8-dynamic, over tests/data/pydocs_heldout.jsonl's 4,199 positions: 99.4% (int8 there: 99.9%)."""
    ids = np.asarray([target.tokenizer.encode(HELD_OUT)])
    reference = target.logits(ids)[0]
    quantized = demo_model(quantize=mode).logits(ids)[0]
    agreement = float((reference.argmax(-1) == quantized.argmax(-1)).mean())
    assert agreement >= bound, agreement


def test_the_demo_speaks(target):
    text = target.generate(PROMPTS[0], 24, temperature=0.7, top_k=40)  # as the README runs it
    words = text.split()
    assert len(words) >= 8 and sum(w.strip(".,:;()").isalpha() for w in words) >= 0.6 * len(words), text
