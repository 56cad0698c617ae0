"""Next-token cross-entropy over the batch's ``labels`` (pretraining: every token; fine-tuning: the labels
hold -100 on the prompt, so only the response is learned). The model shifts the labels itself."""

from __future__ import annotations

import torch


class NextToken:
    name = "next_token"
    columns = ("input_ids", "labels")
    token_loss = "loss"

    def loss(self, engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return engine(**batch).loss, {}


def build(cfg, frozen=None, vocab_size=None) -> NextToken:
    return NextToken()
