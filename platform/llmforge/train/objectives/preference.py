"""Preference alignment on (prompt, chosen, rejected) pairs: DPO, IPO and SimPO (``align.method``).

A batch holds both replies of each pair with the prompt masked out of their labels (``chosen_input_ids``,
``chosen_labels``, ``rejected_...``). The reference (DPO, IPO; ``align.reference``) is one of:

- ``precomputed``: its log-probabilities of each reply (``ref_chosen_logps``, ``ref_rejected_logps``: summed over
  the reply's tokens), computed once before training (train/align.py) and stored with the data, so a resumed or
  resized run never recomputes them;
- ``frozen``: a frozen copy of the base on every worker (train/frozen.py; under ZeRO-3 partitioned like the
  policy), one no-grad forward pass per step;
- ``adapter``: when the policy is a LoRA adapter, the base itself with the adapter disabled, one no-grad forward
  pass per step.

Both replies go through the policy (and the reference) in one forward pass.

With ``pc, pr`` the policy's summed log-probabilities of the chosen and rejected reply and ``rc, rr`` the
reference's, and ``β = align.beta``:

- DPO (Rafailov et al. 2023): ``-log σ(β((pc - rc) - (pr - rr)))``;
- IPO (Azar et al. 2023): ``((pc - rc)/|c| - (pr - rr)/|r| - 1/(2β))²``, on per-token means as TRL computes it;
- SimPO (Meng et al. 2024): ``-log σ(β(pc/|c| - pr/|r|) - γ)``, ``γ = align.simpo_gamma``, no reference.

Metrics, as TRL names them: ``rewards/chosen`` (β(pc - rc); SimPO: β·pc/|c|), ``rewards/rejected``,
``rewards/margins`` (their difference), ``rewards/accuracies`` (the share of pairs whose chosen reward is the
higher), ``logps/chosen``, ``logps/rejected`` (the policy's summed log-probabilities).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def reply_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of each row's labelled tokens (labels shifted against the logits, as in
    causal LM training), and how many tokens that is."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != IGNORE
    picked = torch.gather(F.log_softmax(logits, dim=-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1), mask.sum(-1)


class Preference:
    token_loss = None

    def __init__(self, method: str, beta: float, simpo_gamma: float, reference: str | None = "precomputed",
                 reference_model=None):
        self.name, self.beta, self.gamma = method, beta, simpo_gamma
        self.reference = reference if method != "simpo" else None
        if (self.reference == "frozen") != (reference_model is not None):
            raise ValueError("a frozen reference needs its model, and only it does")
        self.reference_model = reference_model
        self.columns = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels") + \
            (("ref_chosen_logps", "ref_rejected_logps") if self.reference == "precomputed" else ())

    def loss(self, engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        n = batch["chosen_input_ids"].shape[0]
        ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
        labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
        logps, counts = reply_logps(engine(input_ids=ids).logits, labels)
        pc, pr = logps[:n], logps[n:]
        if self.reference in ("adapter", "frozen"):
            with torch.no_grad():
                if self.reference == "frozen":
                    ref, _ = reply_logps(self.reference_model(input_ids=ids).logits, labels)
                else:  # the base under the LoRA policy: the same weights with the adapter off
                    with getattr(engine, "module", engine).disable_adapter():
                        ref, _ = reply_logps(engine(input_ids=ids).logits, labels)
            batch = {**batch, "ref_chosen_logps": ref[:n], "ref_rejected_logps": ref[n:]}
        nc, nr = counts[:n].clamp(min=1), counts[n:].clamp(min=1)
        if self.name == "simpo":
            chosen, rejected = self.beta * pc / nc, self.beta * pr / nr
            loss = -F.logsigmoid(chosen - rejected - self.gamma)
        else:
            rc, rr = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
            chosen, rejected = self.beta * (pc - rc), self.beta * (pr - rr)
            if self.name == "dpo":
                loss = -F.logsigmoid(chosen - rejected)
            else:  # ipo
                loss = ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * self.beta)) ** 2
        with torch.no_grad():
            metrics = {"rewards/chosen": chosen.mean().item(), "rewards/rejected": rejected.mean().item(),
                       "rewards/margins": (chosen - rejected).mean().item(),
                       "rewards/accuracies": (chosen > rejected).float().mean().item(),
                       "logps/chosen": pc.mean().item(), "logps/rejected": pr.mean().item()}
        return loss.mean(), metrics


def build(cfg, frozen=None, vocab_size=None) -> Preference:
    return Preference(cfg.align.method, cfg.align.beta, cfg.align.simpo_gamma, cfg.align.reference_kind, frozen)
