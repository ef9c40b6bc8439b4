"""Recurrent networks for token sequences: ``model.family`` rnn (Elman, tanh), lstm and gru,
optionally bidirectional.

Token embedding → ``layers`` recurrent layers (each direction its own single-layer
``nn.RNN``/``nn.LSTM``/``nn.GRU``, both directions' outputs concatenated as the next layer's
input, Dropout between layers) → the final state of each direction → Dropout → linear head.

Padding: texts are padded with ``PAD_ID`` at the end (ml/text.py), and a served model has one
fixed sequence length, so most rows end in padding. We pool the *last valid step*, not the
last position and not a mean over all positions: the forward direction's output at the last
non-pad token has read exactly the text, and nothing after it. The backward direction must
start at the last word, not at the last pad, so each row's valid prefix is reversed in place
(``t → length-1-t`` for ``t < length``, pads stay where they are) before the backward layer
reads it, and its outputs are put back the same way (the permutation is its own inverse). Its
final state is then at position ``length-1`` of the reversed order. The result is what
``pack_padded_sequence`` would give (``h_n`` of the packed run) but with only gathers and
fixed shapes: packing needs the lengths as Python ints, which ``torch.export`` with a dynamic
batch cannot trace, and it would need sorted rows. Extra padding therefore changes nothing,
which ``tests/unit/test_rnn.py`` checks.

The length of a row is one past its last non-pad token (a pad inside the text is read as a
zero embedding, like any word, rather than cutting the text short). An all-padding row has
length 0 and reads its first (pad) position: finite logits, no NaN.

Every operation has a static shape except the batch, so the module exports with a dynamic
batch dimension (``kubeloop.serving.artifact.save_model``) and serves from rows of floats.
"""

from __future__ import annotations

from typing import Final

import torch
from torch import nn

from kubeloop_pipelines.ml.text import PAD_ID

RECURRENT_FAMILIES: Final = ("rnn", "lstm", "gru")
_CELLS: Final[dict[str, type[nn.RNN | nn.LSTM | nn.GRU]]] = {
    "rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU,
}  # fmt: skip


def valid_lengths(tokens: torch.Tensor) -> torch.Tensor:
    """One past the position of each row's last non-pad token, shape (n,), int64 (0 for a row
    of padding only)."""
    positions = torch.arange(1, tokens.shape[1] + 1, device=tokens.device)
    return ((tokens != PAD_ID).long() * positions).amax(dim=1)


def reverse_valid(sequence: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``sequence`` (n, L, d) with the first ``lengths[i]`` steps of row i in reverse order and
    the rest (the padding) in place. Applying it twice gives back ``sequence``."""
    steps = sequence.shape[1]
    positions = torch.arange(steps, device=sequence.device).unsqueeze(0)
    length = lengths.unsqueeze(1)
    order = torch.where(positions < length, length - 1 - positions, positions)
    index = order.unsqueeze(-1).expand(-1, -1, sequence.shape[2])
    return torch.gather(sequence, 1, index)


def step_at(sequence: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Row i of ``sequence`` (n, L, d) at step ``index[i]``: shape (n, d)."""
    gather_index = index.view(-1, 1, 1).expand(-1, 1, sequence.shape[2])
    return torch.gather(sequence, 1, gather_index).squeeze(1)


class RecurrentNetwork(nn.Module):
    """See the module docstring. Takes token ids (n, L) as int64 or as floats (the serving
    artifact carries rows of floats); returns (n, n_out)."""

    def __init__(
        self, cell: str, vocab_size: int, n_out: int, *, embedding_dim: int, hidden_size: int,
        layers: int, bidirectional: bool, dropout: float,
    ) -> None:  # fmt: skip
        super().__init__()
        if cell not in _CELLS:
            raise ValueError(f"cell={cell!r}; expected one of {list(RECURRENT_FAMILIES)}")
        rnn = _CELLS[cell]
        self.embed = nn.Embedding(vocab_size, embedding_dim, padding_idx=PAD_ID)
        directions = 2 if bidirectional else 1
        self.forward_layers = nn.ModuleList()
        self.backward_layers = nn.ModuleList()
        width = embedding_dim
        for _ in range(layers):
            self.forward_layers.append(rnn(width, hidden_size, batch_first=True))
            if bidirectional:
                self.backward_layers.append(rnn(width, hidden_size, batch_first=True))
            width = hidden_size * directions
        self.feature_dim = width  # hidden_size per direction: bidirectional doubles it
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(width, n_out)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features the head reads: (n, feature_dim)."""
        tokens = x.long()
        lengths = valid_lengths(tokens)
        last = (lengths - 1).clamp(min=0)
        hidden = self.embed(tokens)
        forward_out = hidden
        backward_reversed = hidden
        for i, forward_rnn in enumerate(self.forward_layers):
            if i > 0:
                hidden = self.dropout(hidden)
            forward_out, _ = forward_rnn(hidden)
            if not self.backward_layers:
                hidden = forward_out
                continue
            backward_reversed, _ = self.backward_layers[i](reverse_valid(hidden, lengths))
            hidden = torch.cat([forward_out, reverse_valid(backward_reversed, lengths)], dim=2)
        pooled = step_at(forward_out, last)
        if self.backward_layers:
            # The backward direction's final state: the last step it read, the text's first word.
            pooled = torch.cat([pooled, step_at(backward_reversed, last)], dim=1)
        return pooled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.dropout(self.features(x)))
        return out
