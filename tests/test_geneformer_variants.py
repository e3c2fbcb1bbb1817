"""Geneformer release variants built from the fixture: V1 layout and BioNeMo checkpoints.

Expected values come from an independent float64 numpy re-implementation (per cell, no
padding, eager softmax attention) of the reference forward pass and tokenizer.
"""

from __future__ import annotations

import json
import pickle
import shutil
import tarfile

import anndata as ad
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import scfm
from conftest import fixture_dir
from scfm.data._geneformer_tokenizer import bionemo_tokens
from scfm.errors import (
    CheckpointFormatError,
    CheckpointKeyError,
    CheckpointNotFoundError,
    InvalidInputError,
)
from scfm.model import Geneformer
from scfm.nn import make_key_padding_mask

ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- numpy reference


def _ln(x, w, b, eps=1e-12):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu(x):
    from math import erf, sqrt

    return 0.5 * x * (1 + np.vectorize(erf)(x / sqrt(2)))


def _reference_hidden_states(sd, ids, n_layers, n_heads, pre_ln=False, act="relu"):
    """HF BERT (post-LN) or Megatron BERT (pre-LN) forward of one unpadded cell, float64."""
    g = {k: v.double().numpy() for k, v in sd.items()}
    f = (lambda x: np.maximum(x, 0)) if act == "relu" else _gelu
    x = g["bert.embeddings.word_embeddings.weight"][ids]
    x = x + g["bert.embeddings.position_embeddings.weight"][: len(ids)]
    if not pre_ln:
        x = x + g["bert.embeddings.token_type_embeddings.weight"][0]
        x = _ln(x, g["bert.embeddings.LayerNorm.weight"], g["bert.embeddings.LayerNorm.bias"])
    states = [x]
    for i in range(n_layers):
        p = f"bert.encoder.layer.{i}."

        def lin(h, name, p=p):
            return h @ g[p + name + ".weight"].T + g[p + name + ".bias"]

        h = (
            _ln(x, g[p + "attention.LayerNorm.weight"], g[p + "attention.LayerNorm.bias"])
            if pre_ln
            else x
        )
        n, d = h.shape
        hd = d // n_heads
        q, k, v = (
            lin(h, f"attention.self.{m}").reshape(n, n_heads, hd).transpose(1, 0, 2)
            for m in ("query", "key", "value")
        )
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        ctx = (a @ v).transpose(1, 0, 2).reshape(n, d)
        if pre_ln:
            x = x + lin(ctx, "attention.output.dense")
            h = _ln(x, g[p + "intermediate.LayerNorm.weight"], g[p + "intermediate.LayerNorm.bias"])
            x = x + lin(f(lin(h, "intermediate.dense")), "output.dense")
            if i == n_layers - 1:
                x = _ln(
                    x,
                    g["bert.encoder.final_layernorm.weight"],
                    g["bert.encoder.final_layernorm.bias"],
                )
        else:
            a1 = _ln(
                x + lin(ctx, "attention.output.dense"),
                g[p + "attention.output.LayerNorm.weight"],
                g[p + "attention.output.LayerNorm.bias"],
            )
            x = _ln(
                a1 + lin(f(lin(a1, "intermediate.dense")), "output.dense"),
                g[p + "output.LayerNorm.weight"],
                g[p + "output.LayerNorm.bias"],
            )
        states.append(x)
    return states


def _reference_tokens(adata, token_dict, median_dict, max_genes):
    """Per-cell rank-value encoding without id collapsing (V1 has no mapping dictionary)."""
    x = adata.X.toarray().astype(np.float64)
    cols = [i for i, g in enumerate(adata.var_names) if g in token_dict and g in median_dict]
    out = []
    for row in x:
        vals = (
            row[cols]
            / row.sum()
            * 10_000
            / np.array([median_dict[adata.var_names[c]] for c in cols])
        )
        nz = np.flatnonzero(row[cols] > 0)
        order = nz[np.argsort(-vals[nz], kind="stable")][:max_genes]
        out.append(np.array([token_dict[adata.var_names[cols[j]]] for j in order]))
    return out


# ---------------------------------------------------------------- packed inference


class _Wrapped(torch.nn.Module):
    """A projection that is no plain ``nn.Linear`` (as a LoRA-adapted one)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def _packed_bert(pre_ln, seed, monkeypatch):
    """A random 3-layer BERT (non-trivial LayerNorms) and a padded batch whose packed
    inference covers runs of equal lengths (one attention call each), a 1-token cell and
    groups of ~2 cells. Returns the model, its HF-named state dict, the activation name, the
    lengths, ids and key mask."""
    from scfm.nn import _bert

    torch.manual_seed(seed)
    act = "gelu" if pre_ln else "relu"
    config = _bert.BertConfig(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=40,
        hidden_act=act,
        type_vocab_size=0 if pre_ln else 2,
        pre_layer_norm=pre_ln,
        embedding_layer_norm=not pre_ln,
    )
    model = _bert.BertModel(config).eval()
    with torch.no_grad():  # non-trivial LayerNorm weights and biases
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    sd = {f"bert.{k}": v for k, v in model.state_dict().items()}
    lengths = torch.tensor([7, 31, 31, 1, 20, 20, 20, 9])
    ids = torch.randint(2, 60, (len(lengths), 31))
    mask = make_key_padding_mask(lengths, 31)
    ids[~mask] = 0
    monkeypatch.setattr(_bert, "GROUP_BYTES", 2 * 31 * 4 * 3 * 32)
    return model, sd, act, lengths, ids, mask


@pytest.mark.parametrize("pre_ln", [False, True])
def test_packed_inference_matches_a_per_cell_forward(pre_ln, monkeypatch):
    """Inference drops the padding (packed tokens, groups of cells, fused Q/K/V); every state of
    every cell must equal an unpadded float64 forward of that cell alone, padding reads 0."""
    model, sd, act, lengths, ids, mask = _packed_bert(pre_ln, 0, monkeypatch)
    with torch.no_grad():
        out = model(ids, mask, output_hidden_states=True)
        early = model(ids, mask, output_hidden_states=True, num_layers=2)
    padded = model(ids, mask, output_hidden_states=True)  # training path: padded, masked
    for i, n in enumerate(lengths.tolist()):
        ref = _reference_hidden_states(sd, ids[i, :n].numpy(), 3, 4, pre_ln, act)
        for layer in range(4):
            got = out.hidden_states[layer][i, :n].double().numpy()
            np.testing.assert_allclose(got, ref[layer], atol=2e-5, err_msg=f"cell {i} {layer}")
            grad_path = padded.hidden_states[layer][i, :n].detach().numpy()
            np.testing.assert_allclose(got, grad_path, atol=2e-5)
        # the pre-LN final LayerNorm belongs to the last layer of the stack only
        np.testing.assert_allclose(early.last_hidden_state[i, :n].numpy(), ref[2], atol=2e-5)
    assert len(early.hidden_states) == 3
    assert torch.equal(out.last_hidden_state, out.hidden_states[-1])
    for state in out.hidden_states[1:]:
        assert not state[~mask].any()
    # an adapted projection is called on its own instead of through the fused weight
    layer = model.encoder.layer[1].attention.self
    layer.key = _Wrapped(layer.key)
    with torch.no_grad():
        wrapped = model(ids, mask).last_hidden_state
    np.testing.assert_allclose(
        wrapped[mask].numpy(), out.last_hidden_state[mask].numpy(), atol=1e-6
    )
    # no padding and an empty batch
    with torch.no_grad():
        full = model(ids[1:3, :31], None).last_hidden_state
        empty = model(ids[:0], mask[:0], output_hidden_states=True)
    np.testing.assert_allclose(full.numpy(), out.last_hidden_state[1:3].numpy(), atol=1e-6)
    assert empty.last_hidden_state.shape == (0, 31, 32) and len(empty.hidden_states) == 4


@pytest.mark.parametrize("pre_ln", [False, True])
def test_first_token_only_runs_the_last_layer_for_cls_alone(pre_ln, monkeypatch):
    """first_token_only (cell embeddings read at <cls>): the last computed layer runs its
    query, output and MLP for each cell's first token only and must give that token's state
    of the full forward (float64 per-cell reference), at every depth, in groups of cells,
    with an adapted projection, and on the training path."""
    model, sd, act, lengths, ids, mask = _packed_bert(pre_ln, 1, monkeypatch)
    refs = [
        _reference_hidden_states(sd, ids[i, :n].numpy(), 3, 4, pre_ln, act)
        for i, n in enumerate(lengths.tolist())
    ]
    for depth in range(4):
        with torch.no_grad():
            first = model(ids, mask, num_layers=depth, first_token_only=True)
        assert first.last_hidden_state.shape == (len(lengths), 1, 32)
        assert first.hidden_states is None
        got = first.last_hidden_state[:, 0].double().numpy()
        want = np.stack([ref[depth][0] for ref in refs])
        np.testing.assert_allclose(got, want, atol=2e-5, err_msg=f"depth {depth}")
    with torch.no_grad():
        full = model(ids, mask).last_hidden_state[:, 0]
    training_path = model(ids, mask, first_token_only=True).last_hidden_state[:, 0]
    np.testing.assert_allclose(training_path.detach().numpy(), full.numpy(), atol=1e-6)
    layer = model.encoder.layer[2].attention.self
    layer.query, layer.value = _Wrapped(layer.query), _Wrapped(layer.value)
    with torch.no_grad():
        wrapped = model(ids, mask, first_token_only=True).last_hidden_state[:, 0]
    np.testing.assert_allclose(wrapped.numpy(), full.numpy(), atol=1e-6)
    with pytest.raises(InvalidInputError, match="hidden states"):
        model(ids, mask, output_hidden_states=True, first_token_only=True)


# ---------------------------------------------------------------- V1 layout


@pytest.fixture(scope="module")
def v1_dir(tmp_path_factory):
    """The fixture model re-saved as a V1 release: no <cls>/<eos>, 2048 input, .bin weights."""
    src = fixture_dir("geneformer") / "checkpoint"
    dst = tmp_path_factory.mktemp("v1") / "Geneformer-V1-tiny"
    dst.mkdir()
    with open(src / "token_dictionary_gc104M.pkl", "rb") as fh:
        tokens = pickle.load(fh)
    keep = [0, 1, *range(4, len(tokens))]
    v1_tokens = {"<pad>": 0, "<mask>": 1}
    v1_tokens.update({g: np.int16(i - 2) for g, i in tokens.items() if i >= 4})
    with open(dst / "token_dictionary_gc30M.pkl", "wb") as fh:
        pickle.dump(v1_tokens, fh)
    shutil.copy(src / "gene_median_dictionary_gc104M.pkl", dst / "gene_median_dictionary_gc30M.pkl")
    state = load_file(src / "model.safetensors")
    state["bert.embeddings.word_embeddings.weight"] = state[
        "bert.embeddings.word_embeddings.weight"
    ][keep]
    state["cls.predictions.bias"] = state["cls.predictions.bias"][keep]
    state["bert.embeddings.position_embeddings.weight"] = state[
        "bert.embeddings.position_embeddings.weight"
    ][:2048]
    state["bert.embeddings.position_ids"] = torch.arange(2048)[None]
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
    state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"]
    torch.save(state, dst / "pytorch_model.bin")
    config = json.loads((src / "config.json").read_text())
    config.update(vocab_size=len(keep), max_position_embeddings=2048, transformers_version="4.6.0")
    (dst / "config.json").write_text(json.dumps(config))
    return dst, state, v1_tokens


def test_v1_layout_tokens_and_embeddings(v1_dir):
    path, state, tokens = v1_dir
    fx = fixture_dir("geneformer")
    adata = ad.read_h5ad(fx / "input.h5ad")
    Geneformer.setup_anndata(adata)
    model = Geneformer.from_pretrained(path, adata)
    assert model.config.variant == "V1" and model.config.input_size == 2048
    with open(path / "gene_median_dictionary_gc30M.pkl", "rb") as fh:
        medians = pickle.load(fh)
    ref_tokens = _reference_tokens(adata, tokens, medians, 2048)
    ids, lengths = model.get_tokens()
    for i, ref in enumerate(ref_tokens):
        np.testing.assert_array_equal(ids[i, : lengths[i]], ref)
    z = model.get_latent_representation(progress_bar=False)  # V1 default: mean, layer -2
    z_last = model.get_latent_representation(hidden_layer=-1, progress_bar=False)
    for i in (0, 7, 33):
        states = _reference_hidden_states(state, ref_tokens[i], 3, 4)
        np.testing.assert_allclose(z[i], states[2].mean(0), atol=ATOL, rtol=0)
        np.testing.assert_allclose(z_last[i], states[3].mean(0), atol=ATOL, rtol=0)


# ---------------------------------------------------------------- BioNeMo


def _to_nemo2(sd, heads):
    """Our pre-LN module names -> Megatron-core NeMo2 names (fused, head-interleaved QKV)."""
    out = {}
    n_layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("bert.encoder.layer."))
    out["embedding.word_embeddings.weight"] = sd["bert.embeddings.word_embeddings.weight"]
    out["embedding.position_embeddings.weight"] = sd["bert.embeddings.position_embeddings.weight"]
    for i in range(n_layers):
        p, m = f"bert.encoder.layer.{i}.", f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = (sd[f"{p}attention.self.{n}.{kind}"] for n in ("query", "key", "value"))
            h = q.shape[0]
            parts = [t.reshape(heads, h // heads, *t.shape[1:]) for t in (q, k, v)]
            out[f"{m}self_attention.linear_qkv.{kind}"] = torch.stack(parts, 1).reshape(
                3 * h, *q.shape[1:]
            )
            out[f"{m}self_attention.linear_qkv.layer_norm_{kind}"] = sd[
                f"{p}attention.LayerNorm.{kind}"
            ]
            out[f"{m}self_attention.linear_proj.{kind}"] = sd[f"{p}attention.output.dense.{kind}"]
            out[f"{m}mlp.linear_fc1.layer_norm_{kind}"] = sd[f"{p}intermediate.LayerNorm.{kind}"]
            out[f"{m}mlp.linear_fc1.{kind}"] = sd[f"{p}intermediate.dense.{kind}"]
            out[f"{m}mlp.linear_fc2.{kind}"] = sd[f"{p}output.dense.{kind}"]
        out[f"{m}self_attention.core_attention._extra_state"] = torch.zeros(3)
    for kind in ("weight", "bias"):
        out[f"encoder.final_layernorm.{kind}"] = sd[f"bert.encoder.final_layernorm.{kind}"]
        out[f"lm_head.dense.{kind}"] = sd[f"cls.predictions.transform.dense.{kind}"]
        out[f"lm_head.layer_norm.{kind}"] = sd[f"cls.predictions.transform.LayerNorm.{kind}"]
    out["output_layer.bias"] = sd["cls.predictions.bias"]
    return out


@pytest.fixture(scope="module")
def bionemo(tmp_path_factory):
    fx = fixture_dir("geneformer")
    adata = ad.read_h5ad(fx / "input.h5ad")
    Geneformer.setup_anndata(adata)
    config = {"variant": "bionemo", "hidden_size": 16, "num_hidden_layers": 2}
    config.update(num_attention_heads=2, intermediate_size=32, hidden_act="gelu", vocab_size=25472)
    model = Geneformer(adata, config)
    gen = torch.Generator().manual_seed(3)
    sd = {
        k: v + 0.3 * torch.randn(v.shape, generator=gen)
        for k, v in model.module.state_dict().items()
        if k != "token_medians"
    }
    return adata, sd, _to_nemo2(sd, heads=2)


def _bionemo_expected(adata, sd, idx):
    dicts = scfm.data.load_geneformer_dictionaries(version="V1")
    tokens = bionemo_tokens(dicts.token_dictionary)
    ref = _reference_tokens(adata, tokens, dicts.gene_median_dictionary, 2047)
    out = []
    for i in idx:
        ids = np.concatenate([[0], ref[i]])
        final = _reference_hidden_states(sd, ids, 2, 2, pre_ln=True, act="gelu")[-1]
        out.append(final[1 : len(ids) - 1].mean(0))  # BioNeMo drops [CLS] and the last token
    return np.array(out)


def test_bionemo_nemo2_torch_file(bionemo, tmp_path):
    adata, sd, nemo2 = bionemo
    path = tmp_path / "geneformer_10M_240530.pt"
    torch.save({f"module.{k}": v for k, v in nemo2.items()}, path)
    model = Geneformer.from_pretrained(path, adata, num_attention_heads=2)
    assert model.config.variant == "bionemo" and model.module.bert_config.pre_layer_norm
    z = model.get_latent_representation(progress_bar=False)
    idx = [0, 5, 40]
    np.testing.assert_allclose(z[idx], _bionemo_expected(adata, sd, idx), atol=ATOL, rtol=0)
    ids, _lengths = model.get_tokens(indices=[0])
    assert ids[0, 0] == 0 and ids[0, 1] >= 5  # [CLS] then genes at V1 id + 3


def test_bionemo_distributed_checkpoint_dir(bionemo, tmp_path):
    import torch.distributed.checkpoint as dcp

    adata, sd, nemo2 = bionemo
    weights = tmp_path / "ckpt" / "weights"
    dcp.save(
        {f"module.{k}": v.clone() for k, v in nemo2.items()},
        checkpoint_id=str(weights),
        no_dist=True,
    )
    model = Geneformer.from_pretrained(tmp_path / "ckpt", adata, num_attention_heads=2)
    idx = [3]
    z = model.get_latent_representation(indices=idx, progress_bar=False)
    np.testing.assert_allclose(z, _bionemo_expected(adata, sd, idx), atol=ATOL, rtol=0)


def test_bionemo_nemo1_tarball(bionemo, tmp_path):
    adata, sd, nemo2 = bionemo
    renames = [
        ("self_attention.linear_qkv.layer_norm_", "input_layernorm."),
        ("mlp.linear_fc1.layer_norm_", "post_attention_layernorm."),
        ("linear_qkv", "query_key_value"),
        ("linear_proj", "dense"),
        ("linear_fc1", "dense_h_to_4h"),
        ("linear_fc2", "dense_4h_to_h"),
        ("lm_head.layer_norm", "lm_head.layernorm"),
        ("output_layer.bias", "lm_head.bias"),
    ]
    nemo1 = {}
    for k, v in nemo2.items():
        for old, new in renames:
            k = k.replace(old, new)
        prefix = "model." if k.startswith("lm_head") else "model.language_model."
        nemo1[prefix + k] = v
    (tmp_path / "x").mkdir()
    torch.save({"state_dict": nemo1}, tmp_path / "x" / "model_weights.ckpt")
    with tarfile.open(tmp_path / "geneformer.nemo", "w") as tar:
        tar.add(tmp_path / "x" / "model_weights.ckpt", arcname="./model_weights.ckpt")
    model = Geneformer.from_pretrained(tmp_path / "geneformer.nemo", adata, num_attention_heads=2)
    idx = [9]
    z = model.get_latent_representation(indices=idx, progress_bar=False)
    np.testing.assert_allclose(z, _bionemo_expected(adata, sd, idx), atol=ATOL, rtol=0)


def test_bionemo_strict_keys(bionemo, tmp_path):
    adata, _, nemo2 = bionemo
    bad = dict(nemo2)
    del bad["encoder.layers.1.mlp.linear_fc2.bias"]
    bad["encoder.layers.0.mlp.router.weight"] = torch.zeros(2)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(CheckpointKeyError, match="router"):
        Geneformer.from_pretrained(tmp_path / "bad.pt", adata, num_attention_heads=2)
    del bad["encoder.layers.0.mlp.router.weight"]
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(CheckpointKeyError, match=r"layer\.1\.output\.dense\.bias"):
        Geneformer.from_pretrained(tmp_path / "bad.pt", adata, num_attention_heads=2)


# ---------------------------------------------------------------- HF release files


@pytest.fixture(scope="module")
def exp():
    return np.load(fixture_dir("geneformer") / "expected.npz")


def _copy_checkpoint(dst):
    shutil.copytree(fixture_dir("geneformer") / "checkpoint", dst)
    return dst


def _adata(**setup):
    adata = ad.read_h5ad(fixture_dir("geneformer") / "input.h5ad")
    Geneformer.setup_anndata(adata, **setup)
    return adata


def test_pytorch_bin_with_position_ids_and_tied_decoder(exp, tmp_path):
    ckpt = _copy_checkpoint(tmp_path / "v")
    state = load_file(ckpt / "model.safetensors")
    state["bert.embeddings.position_ids"] = torch.arange(4096)[None]
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
    state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"]
    torch.save(state, ckpt / "pytorch_model.bin")
    (ckpt / "model.safetensors").unlink()
    model = Geneformer.from_pretrained(ckpt, _adata())
    z = model.get_latent_representation(progress_bar=False)
    np.testing.assert_allclose(z, exp["cell_embeddings"], atol=ATOL, rtol=0)


def test_strict_loading_lists_every_bad_key(tmp_path):
    ckpt = _copy_checkpoint(tmp_path / "bad")
    state = load_file(ckpt / "model.safetensors")
    del state["bert.encoder.layer.1.output.dense.bias"]
    state["bert.encoder.layer.9.extra.weight"] = torch.zeros(2)
    state["cls.predictions.bias"] = torch.zeros(7)
    save_file(state, ckpt / "model.safetensors")
    with pytest.raises(CheckpointKeyError) as err:
        Geneformer.from_pretrained(ckpt, _adata())
    msg = str(err.value)
    assert "bert.encoder.layer.1.output.dense.bias" in msg
    assert "bert.encoder.layer.9.extra.weight" in msg
    assert "cls.predictions.bias" in msg


def test_nan_weights_are_refused(tmp_path):
    ckpt = _copy_checkpoint(tmp_path / "nan")
    state = load_file(ckpt / "model.safetensors")
    state["bert.encoder.layer.2.attention.self.key.weight"][0, 0] = float("nan")
    save_file(state, ckpt / "model.safetensors")
    with pytest.raises(CheckpointFormatError, match=r"layer\.2\.attention\.self\.key\.weight"):
        Geneformer.from_pretrained(ckpt, _adata())


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        ({"num_hidden_layers": 1_000_000}, "num_hidden_layers"),
        ({"num_hidden_layers": 1e6}, "num_hidden_layers"),
        ({"hidden_size": "64"}, "hidden_size"),
        ({"intermediate_size": -128}, "intermediate_size"),
        ({"num_attention_heads": 5}, "num_attention_heads"),
        ({"hidden_act": "swishy"}, "hidden_act"),
        ({"layer_norm_eps": None}, "layer_norm_eps"),
        ({"hidden_dropout_prob": 1.5}, "hidden_dropout_prob"),
        ({"vocab_size": None}, "vocab_size"),
        ({"num_hidden_layers": 2}, "num_hidden_layers"),  # the weights hold 3 layers
        ({"intermediate_size": 256}, "intermediate_size"),
        ({"max_position_embeddings": 2048}, "max_position_embeddings"),
    ],
)
def test_bad_config_fails_fast_naming_the_key(tmp_path, edit, key):
    import time

    ckpt = _copy_checkpoint(tmp_path / "cfg")
    config = json.loads((ckpt / "config.json").read_text())
    config.update(edit)
    (ckpt / "config.json").write_text(json.dumps(config))
    adata = _adata()
    start = time.perf_counter()
    with pytest.raises(CheckpointFormatError, match=key):
        Geneformer.from_pretrained(ckpt, adata)
    assert time.perf_counter() - start < 1.0
    assert "scfm" not in adata.uns  # nothing left behind


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\udcff"])
def test_malformed_config_json(tmp_path, text):
    ckpt = _copy_checkpoint(tmp_path / "json")
    (ckpt / "config.json").write_text(text, errors="surrogateescape")
    with pytest.raises(CheckpointFormatError, match=r"config\.json"):
        Geneformer.from_pretrained(ckpt, _adata())


def test_missing_config_key_is_named(tmp_path):
    ckpt = _copy_checkpoint(tmp_path / "nokey")
    config = json.loads((ckpt / "config.json").read_text())
    del config["num_attention_heads"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointFormatError, match="num_attention_heads"):
        Geneformer.from_pretrained(ckpt, _adata())


def test_missing_medians_for_v2_is_explained(tmp_path):
    ckpt = _copy_checkpoint(tmp_path / "nomed")
    (ckpt / "gene_median_dictionary_gc104M.pkl").unlink()
    with pytest.raises(CheckpointNotFoundError, match="gene_median_file"):
        Geneformer.from_pretrained(ckpt, _adata())
    model = Geneformer.from_pretrained(
        ckpt,
        _adata(),
        gene_median_file=fixture_dir("geneformer")
        / "checkpoint"
        / "gene_median_dictionary_gc104M.pkl",
    )
    assert model.config.variant == "V2"


def test_sequence_classification_directory(tmp_path):
    ckpt = _copy_checkpoint(tmp_path / "clf")
    state = {
        k: v for k, v in load_file(ckpt / "model.safetensors").items() if k.startswith("bert.")
    }
    gen = torch.Generator().manual_seed(0)
    state["bert.pooler.dense.weight"] = torch.randn(64, 64, generator=gen) * 0.2
    state["bert.pooler.dense.bias"] = torch.randn(64, generator=gen) * 0.1
    state["classifier.weight"] = torch.randn(3, 64, generator=gen)
    state["classifier.bias"] = torch.randn(3, generator=gen)
    save_file(state, ckpt / "model.safetensors")
    config = json.loads((ckpt / "config.json").read_text())
    config["architectures"] = ["BertForSequenceClassification"]
    config["id2label"] = {"0": "B cell", "1": "T cell", "2": "monocyte"}
    (ckpt / "config.json").write_text(json.dumps(config))
    adata = _adata()
    model = Geneformer.from_pretrained(ckpt, adata)
    assert model.classifier_labels == ["B cell", "T cell", "monocyte"]
    probs = model.predict(adata, soft=True, key_added="pred", progress_bar=False)
    # reference: tanh(dense(first token of the last layer)) -> classifier
    h = model.get_latent_representation(pooling="cls", hidden_layer=-1, progress_bar=False)
    pooled = np.tanh(
        h @ state["bert.pooler.dense.weight"].numpy().T + state["bert.pooler.dense.bias"].numpy()
    )
    logits = pooled @ state["classifier.weight"].numpy().T + state["classifier.bias"].numpy()
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(probs.to_numpy(), expected, atol=ATOL, rtol=0)
    assert list(adata.obs["pred"].cat.categories) == ["B cell", "T cell", "monocyte"]
    np.testing.assert_array_equal(
        adata.obs["pred"].astype(str).to_numpy(), np.array(probs.columns)[expected.argmax(1)]
    )
    # save / load keeps the head (pooler included) exactly
    model.save(tmp_path / "saved")
    again = Geneformer.load(tmp_path / "saved", adata=_adata())
    np.testing.assert_allclose(again.predict(soft=True, progress_bar=False), probs, atol=1e-6)


def test_save_load_roundtrip_and_another_adata(exp, tmp_path):
    model = Geneformer.from_pretrained(fixture_dir("geneformer") / "checkpoint", _adata())
    model.save(tmp_path / "saved")
    query = _adata()[:, ::-1][:20].copy()
    Geneformer.setup_anndata(query)
    again = Geneformer.load(tmp_path / "saved", adata=query)
    assert again.config == model.config and again.vocabulary.equals(model.vocabulary)
    z = again.get_latent_representation(progress_bar=False)
    np.testing.assert_allclose(z, exp["cell_embeddings"][:20], atol=ATOL, rtol=0)
    np.testing.assert_array_equal(z, model.get_latent_representation(query, progress_bar=False))


def test_bionemo_config_errors(bionemo, tmp_path):
    adata, _, nemo2 = bionemo
    torch.save(nemo2, tmp_path / "b.pt")
    with pytest.raises(CheckpointFormatError, match="num_attention_heads"):
        Geneformer.from_pretrained(tmp_path / "b.pt", adata, num_attention_heads=3)
    with pytest.raises(CheckpointFormatError, match="hidden_act"):
        Geneformer.from_pretrained(tmp_path / "b.pt", adata, num_attention_heads=2, hidden_act="x")


def test_a_weights_file_instead_of_the_folder_says_pass_the_folder():
    adata = ad.read_h5ad(fixture_dir("geneformer") / "input.h5ad")
    scfm.model.Geneformer.setup_anndata(adata)
    with pytest.raises(CheckpointNotFoundError, match="pass the release folder"):
        scfm.model.Geneformer.from_pretrained(
            fixture_dir("geneformer") / "checkpoint" / "model.safetensors", adata
        )
    assert "scfm" not in adata.uns
