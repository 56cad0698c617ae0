"""Knowledge distillation (``llmforge distill``): the student learns the teacher's next-token distributions.

With ``s``, ``t`` the student's and the teacher's logits at a position that has a label, ``T`` the temperature
(``distill.temperature``) and ``α = distill.alpha``:

    loss = α · T² · KL + (1 − α) · CE(s, label)

where KL is forward, ``KL(softmax(t/T) ‖ softmax(s/T))`` (Hinton et al. 2015: the student covers every token
the teacher gives mass to), or reverse with ``distill.kl: reverse``, ``KL(softmax(s/T) ‖ softmax(t/T))`` (the
student settles on the teacher's modes; MiniLLM, Gu et al. 2023). ``T²`` keeps the KL's gradients at the CE's
scale whatever ``T`` (Hinton et al.). Both distributions are over the tokenizer's ids only (``vocab_size``):
a model whose embedding is padded beyond them has its extra logits left out, so teacher and student may pad
differently.

The teacher is frozen (train/frozen.py) and runs on the same micro-batch. Metrics: ``kl``, ``ce`` (the
student's plain next-token loss, which validation reports as ``val_loss``: comparable with pretraining's) and
``teacher_ce`` (the teacher's, on the same batches: the floor the student is pulled towards).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


class Distill:
    name = "distill"
    columns = ("input_ids", "labels")
    token_loss = "ce"

    def __init__(self, teacher, alpha: float, temperature: float, kl: str, vocab_size: int | None):
        if teacher is None:
            raise ValueError("distillation needs the teacher model")
        self.teacher, self.alpha, self.temperature, self.reverse = teacher, alpha, temperature, kl == "reverse"
        self.vocab_size = vocab_size

    def loss(self, engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        ids, labels = batch["input_ids"], batch["labels"][:, 1:]
        mask = labels != IGNORE
        student = engine(input_ids=ids).logits[:, :-1][mask].float()     # (tokens, vocab) at labelled positions
        with torch.no_grad():
            teacher = self.teacher(input_ids=ids).logits[:, :-1][mask].float()
        targets = labels[mask]
        vocab = self.vocab_size or min(student.shape[-1], teacher.shape[-1])
        student, teacher = student[:, :vocab], teacher[:, :vocab]
        t = self.temperature
        s_logp_t = F.log_softmax(student / t if t != 1 else student, dim=-1)
        t_logp_t = F.log_softmax(teacher / t if t != 1 else teacher, dim=-1)
        # At T=1 the tempered distributions are the plain ones: one log-softmax each, not two.
        s_logp = s_logp_t if t == 1 else F.log_softmax(student, dim=-1)
        ce = F.nll_loss(s_logp, targets)
        if self.reverse:
            kl = (s_logp_t.exp() * (s_logp_t - t_logp_t)).sum(-1).mean()
        else:
            kl = (t_logp_t.exp() * (t_logp_t - s_logp_t)).sum(-1).mean()
        loss = self.alpha * t ** 2 * kl + (1 - self.alpha) * ce
        with torch.no_grad():
            t_logp = t_logp_t if t == 1 else F.log_softmax(teacher, dim=-1)
            metrics = {"kl": kl.item(), "ce": ce.item(), "teacher_ce": F.nll_loss(t_logp, targets).item()}
        return loss, metrics


def build(cfg, frozen=None, vocab_size=None) -> Distill:
    d = cfg.distill
    return Distill(frozen, d.alpha, d.temperature, d.kl, vocab_size)
