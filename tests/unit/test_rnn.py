"""Recurrent text models (``model.family`` rnn, lstm, gru): they learn, pool the last valid
step of each direction (so padding changes nothing), export with a dynamic batch and serve
through the model artifact; and a bidirectional LSTM tuned by CMA-ES runs the whole compiled
pipeline on the local runner."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from kubeloop.api.training_run import ModelSpec
from kubeloop.serving.artifact import load_model, save_model
from kubeloop_pipelines.contract import StepError
from kubeloop_pipelines.ml.models import arch_from, build_model
from kubeloop_pipelines.ml.recurrent import RecurrentNetwork
from kubeloop_pipelines.ml.text import encode_texts, fit_vocab
from kubeloop_pipelines.ml.train import fit, predict, score

FAMILIES = ("rnn", "lstm", "gru")
# torch.export notes that nn.RNNBase re-assigns its ``_flat_weights`` list while tracing; the
# exported program is unaffected (the round-trip test below checks the outputs).
pytestmark = pytest.mark.filterwarnings("ignore:The tensor attributes .*_flat_weights")
KEYWORD = "refund"
FILLER = ("the", "box", "was", "blue", "and", "it", "came", "late", "on", "monday", "small", "red")


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models on a shared machine: one intra-op thread is faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def keyword_texts(n: int, seed: int) -> tuple[list[str], np.ndarray[Any, Any]]:
    """Texts of 3-10 filler words; half of them hold KEYWORD at a random place: label 1."""
    rng = np.random.default_rng(seed)
    texts: list[str] = []
    labels: list[int] = []
    for i in range(n):
        words = [str(w) for w in rng.choice(FILLER, size=int(rng.integers(3, 11)))]
        positive = i % 2 == 1
        if positive:
            words[int(rng.integers(0, len(words)))] = KEYWORD
        texts.append(" ".join(words))
        labels.append(int(positive))
    return texts, np.asarray(labels, dtype=np.int64)


def spec_for(family: str, **fields: Any) -> ModelSpec:
    base: dict[str, Any] = {
        "family": family, "embeddingDim": 16, "hiddenSize": 16, "layers": 1, "dropout": 0.0,
        "epochs": 12, "batchSize": 32, "learningRate": 0.01, "earlyStopping": None,
    }  # fmt: skip
    return ModelSpec.model_validate(base | fields)


def small_net(family: str, *, bidirectional: bool, layers: int = 2) -> RecurrentNetwork:
    arch = arch_from(
        spec_for(family, bidirectional=bidirectional, layers=layers, hiddenSize=6,
                 embeddingDim=8),
        {}, input_shape=(8,), n_outputs=3, vocab_size=12,
    )  # fmt: skip
    net = build_model(arch).eval()
    assert isinstance(net, RecurrentNetwork)
    return net


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_learns_a_keyword_far_above_chance(family: str) -> None:
    texts, labels = keyword_texts(320, seed=0)
    vocab, seq_len = fit_vocab(pd.Series(texts[:256]))
    ids = encode_texts(texts, vocab, seq_len)
    assert (ids[:, -1] == 0).mean() > 0.5  # most rows end in padding
    model = spec_for(family)
    arch = arch_from(model, {}, input_shape=(seq_len,), n_outputs=2, vocab_size=len(vocab))
    result = fit(
        arch, ids[:256], labels[:256], ids[256:], labels[256:], task="classification",
        model=model, modality="text", metric="accuracy",
    )  # fmt: skip
    assert result.history[-1].train_loss < result.history[0].train_loss
    probs = predict(result.module, ids[256:], "classification")
    accuracy = score("accuracy", "classification", labels[256:], probs)
    print(f"{family} keyword accuracy={accuracy:.3f}")
    assert accuracy >= 0.85  # chance is 0.5


@pytest.mark.parametrize("family", FAMILIES)
def test_bidirectional_doubles_the_features_the_head_reads(family: str) -> None:
    rows = torch.tensor([[3, 4, 5, 0, 0, 0, 0, 0], [2, 2, 7, 9, 1, 0, 0, 0]])
    one = small_net(family, bidirectional=False)
    two = small_net(family, bidirectional=True)
    assert one.features(rows).shape == (2, 6)
    assert two.features(rows).shape == (2, 12)
    assert (one.head.in_features, two.head.in_features) == (6, 12)
    assert two(rows).shape == (2, 3)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_extra_padding_leaves_the_logits_unchanged(family: str, bidirectional: bool) -> None:
    """Last-valid-step pooling: the same texts padded to 8 or to 20 positions, alone or beside
    rows of other lengths, give the same logits; an all-padding row stays finite."""
    torch.manual_seed(0)
    net = small_net(family, bidirectional=bidirectional)
    rows = torch.tensor([[3, 4, 5, 0, 0, 0, 0, 0], [2, 2, 7, 9, 1, 6, 8, 10], [0] * 8])
    out = net(rows)
    assert torch.isfinite(out).all()
    padded = torch.cat([rows, torch.zeros(3, 12, dtype=torch.long)], dim=1)
    torch.testing.assert_close(net(padded), out, rtol=0, atol=1e-6)
    torch.testing.assert_close(net(rows[:1, :3]), out[:1], rtol=0, atol=1e-6)
    # ... and the pads really are not read: a text's words still matter
    assert not torch.allclose(net(torch.tensor([[5, 4, 3, 0, 0, 0, 0, 0]])), out[:1])


@pytest.mark.parametrize("family", FAMILIES)
def test_pooling_equals_the_packed_sequence_final_states(family: str) -> None:
    """One bidirectional layer: the pooled features are ``h_n`` of torch's own packed run."""
    torch.manual_seed(1)
    net = small_net(family, bidirectional=True, layers=1)
    cell = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[family]
    reference = cell(8, 6, batch_first=True, bidirectional=True)
    weights = dict(net.forward_layers[0].named_parameters())
    backward = dict(net.backward_layers[0].named_parameters())
    with torch.no_grad():
        for name, param in reference.named_parameters():
            source = backward if name.endswith("_reverse") else weights
            param.copy_(source[name.removesuffix("_reverse")])
    rows = torch.tensor([[3, 4, 5, 0, 0, 0], [2, 2, 7, 9, 1, 6], [8, 0, 0, 0, 0, 0]])
    lengths = torch.tensor([3, 6, 1])
    packed = nn.utils.rnn.pack_padded_sequence(
        net.embed(rows), lengths, batch_first=True, enforce_sorted=False
    )
    _, state = reference(packed)
    h_n = state[0] if isinstance(state, tuple) else state
    expected = torch.cat([h_n[0], h_n[1]], dim=1)
    torch.testing.assert_close(net.features(rows), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("family", "bidirectional"), [("rnn", False), ("lstm", True), ("gru", True)]
)
def test_exports_and_serves_through_the_model_artifact(
    family: str, bidirectional: bool, tmp_path: Path
) -> None:
    torch.manual_seed(2)
    net = small_net(family, bidirectional=bidirectional)
    features = [f"tok_{i}" for i in range(8)]
    save_model(
        tmp_path, net, task="classification", features=features, classes=["a", "b", "c"],
        mean=[0.0] * 8, scale=[1.0] * 8, reference={}, modality="text",
    )  # fmt: skip
    served = load_model(tmp_path)
    assert served.modality == "text"
    rng = np.random.default_rng(0)
    for batch in (1, 5):
        ids = rng.integers(1, 12, size=(batch, 8))
        ids[:, int(rng.integers(2, 8)) :] = 0  # padded texts, as the transforms send them
        rows = ids.astype(np.float32)  # the runtime carries floats
        eager = torch.softmax(net(torch.from_numpy(rows)), dim=1).detach().numpy()
        probs = served.predict(rows)
        assert probs.shape == (batch, 3)
        np.testing.assert_allclose(probs, eager, rtol=1e-5, atol=1e-6)


def test_recurrent_families_need_text() -> None:
    with pytest.raises(StepError) as caught:
        arch_from(spec_for("lstm"), {}, input_shape=(30,), n_outputs=2)
    assert caught.value.field == "model.family"
    assert "'lstm'" in caught.value.message
    assert "vocab_size=0" in caught.value.message
    arch = arch_from(
        spec_for("gru"), {"hiddenSize": 24, "bidirectional": "true"}, input_shape=(8,),
        n_outputs=2, vocab_size=30,
    )  # fmt: skip
    assert (arch["hidden_size"], arch["bidirectional"]) == (24, True)  # both are tunable
