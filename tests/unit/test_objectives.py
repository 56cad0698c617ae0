"""The training objectives' arithmetic against hand computations (a fake engine returns fixed logits)."""

import math

import pytest
import torch
import torch.nn.functional as F

from llmforge.config import load_config
from llmforge.train import objectives
from llmforge.train.objectives.preference import reply_logps


class FixedLogits:
    """An 'engine' whose next-token distribution at every position is ``logits[row]``."""

    def __init__(self, rows: torch.Tensor, seq: int):
        self.rows, self.seq = rows, seq

    def __call__(self, input_ids, labels=None):
        logits = self.rows[:, None, :].expand(-1, self.seq, -1)

        class Out:
            pass
        out = Out()
        out.logits = logits
        if labels is not None:
            out.loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                       ignore_index=-100)
        return out


def test_reply_logps_sums_only_the_labelled_tokens():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25]] * 4]))
    labels = torch.tensor([[-100, -100, 0, 1]])  # predicted from positions 1 and 2
    logps, count = reply_logps(logits, labels)
    assert count.item() == 2 and logps.item() == pytest.approx(math.log(0.5) + math.log(0.25))


def batch(chosen_token: int, rejected_token: int, reply: int = 3, seq: int = 6):
    def side(token):
        ids = torch.full((1, seq), token)
        labels = ids.clone()
        labels[:, : seq - reply] = -100
        return ids, labels
    (ci, cl), (ri, rl) = side(chosen_token), side(rejected_token)
    return {"chosen_input_ids": ci, "chosen_labels": cl, "rejected_input_ids": ri, "rejected_labels": rl,
            "ref_chosen_logps": torch.tensor([3 * math.log(0.25)]), "ref_rejected_logps": torch.tensor([3 * math.log(0.25)])}


@pytest.mark.parametrize("method", ["dpo", "ipo", "simpo"])
def test_preference_losses_match_their_formulas(method):
    beta, gamma = 0.5, 0.3
    cfg = load_config(None, {"align.method": method, "align.beta": beta, "align.simpo_gamma": gamma})
    objective = objectives.get("preference", cfg)
    assert ("ref_chosen_logps" in objective.columns) == (method != "simpo")
    # Row 0 (chosen) and row 1 (rejected) see the same distribution: token 0 at 0.5, tokens 1-2 at 0.25.
    probs = torch.tensor([[0.5, 0.25, 0.25]] * 2)
    engine = FixedLogits(torch.log(probs), seq=6)
    loss, metrics = objective.loss(engine, batch(chosen_token=0, rejected_token=1))
    pc, pr = 3 * math.log(0.5), 3 * math.log(0.25)   # three reply tokens each
    rc = rr = 3 * math.log(0.25)
    if method == "dpo":
        want = -math.log(1 / (1 + math.exp(-beta * ((pc - rc) - (pr - rr)))))
        chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    elif method == "ipo":
        want = ((pc - rc) / 3 - (pr - rr) / 3 - 1 / (2 * beta)) ** 2
        chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    else:
        want = -math.log(1 / (1 + math.exp(-(beta * pc / 3 - beta * pr / 3 - gamma))))
        chosen, rejected = beta * pc / 3, beta * pr / 3
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert metrics["rewards/chosen"] == pytest.approx(chosen, rel=1e-5)
    assert metrics["rewards/margins"] == pytest.approx(chosen - rejected, rel=1e-5)
    assert metrics["rewards/accuracies"] == 1.0 and metrics["logps/chosen"] == pytest.approx(pc, rel=1e-5)
    # Swapping the replies flips the preference.
    _, swapped = objective.loss(engine, batch(chosen_token=1, rejected_token=0))
    assert swapped["rewards/accuracies"] == 0.0 and swapped["rewards/margins"] < 0


def test_next_token_is_the_models_own_loss_and_unknown_objectives_are_named():
    engine = FixedLogits(torch.log(torch.tensor([[0.5, 0.25, 0.25]])), seq=4)
    ids = torch.tensor([[0, 0, 1, 2]])
    loss, metrics = objectives.get("next_token", load_config(None, {})).loss(engine, {"input_ids": ids, "labels": ids})
    assert metrics == {} and loss.item() == pytest.approx(-(math.log(0.5) + 2 * math.log(0.25)) / 3, rel=1e-5)
    with pytest.raises(ValueError, match="no training objective 'kto'"):
        objectives.get("kto", load_config(None, {}))


def test_a_frozen_reference_is_run_on_both_replies_in_the_step():
    cfg = load_config(None, {"align.reference": "frozen", "align.beta": 0.5})
    policy = FixedLogits(torch.log(torch.tensor([[0.5, 0.25, 0.25]] * 2)), seq=6)
    with pytest.raises(ValueError, match="frozen reference needs its model"):
        objectives.get("preference", cfg)
    # The reference prefers the rejected reply's token (1) as strongly as the policy prefers the chosen one's (0).
    reference = FixedLogits(torch.log(torch.tensor([[0.25, 0.5, 0.25]] * 2)), seq=6)
    objective = objectives.get("preference", cfg, reference)
    assert not any(c.startswith("ref_") for c in objective.columns)  # nothing read from the data
    b = {k: v for k, v in batch(chosen_token=0, rejected_token=1).items() if not k.startswith("ref_")}
    loss, metrics = objective.loss(policy, b)
    pc, pr, rc, rr = 3 * math.log(0.5), 3 * math.log(0.25), 3 * math.log(0.25), 3 * math.log(0.5)
    assert metrics["rewards/chosen"] == pytest.approx(0.5 * (pc - rc), rel=1e-5)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.5 * ((pc - rc) - (pr - rr))))), rel=1e-5)
    # Against itself the policy has no preference: ln 2, as at a DPO run's first step.
    loss, metrics = objectives.get("preference", cfg, policy).loss(policy, b)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6) and metrics["rewards/margins"] == 0


@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_distillation_is_alpha_t2_kl_plus_the_rest_ce_on_the_shared_vocabulary(kl):
    alpha, temp = 0.3, 2.0
    cfg = load_config(None, {"distill.alpha": alpha, "distill.temperature": temp, "distill.kl": kl})
    s_logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    # The teacher's embedding is padded to 5 ids; the two padded ones are left out (vocab_size 3).
    t_logits = torch.cat([torch.log(torch.tensor([[0.2, 0.6, 0.2]])), torch.tensor([[9.0, 9.0]])], dim=1)
    objective = objectives.get("distill", cfg, FixedLogits(t_logits, seq=4), vocab_size=3)
    assert objective.token_loss == "ce" and objective.columns == ("input_ids", "labels")
    ids = torch.tensor([[0, 1, 2, 1]])
    labels = torch.tensor([[-100, -100, 2, 1]])  # two labelled positions, both under the same distributions
    loss, metrics = objective.loss(FixedLogits(s_logits, seq=4), {"input_ids": ids, "labels": labels})
    s = F.log_softmax(s_logits / temp, -1)
    t = F.log_softmax(t_logits[:, :3] / temp, -1)
    want_kl = (t.exp() * (t - s)).sum() if kl == "forward" else (s.exp() * (s - t)).sum()
    want_ce = -(math.log(0.2) + math.log(0.3)) / 2
    assert metrics["kl"] == pytest.approx(want_kl.item(), rel=1e-5) and metrics["ce"] == pytest.approx(want_ce, rel=1e-5)
    assert loss.item() == pytest.approx(alpha * temp ** 2 * want_kl.item() + (1 - alpha) * want_ce, rel=1e-5)
    assert metrics["teacher_ce"] == pytest.approx(-(math.log(0.2) + math.log(0.6)) / 2, rel=1e-5)
    # A student equal to the teacher (on the shared ids) has nothing left to learn from it.
    _, same = objectives.get("distill", cfg, FixedLogits(t_logits, seq=4), vocab_size=3).loss(
        FixedLogits(t_logits[:, :3], seq=4), {"input_ids": ids, "labels": labels})
    assert same["kl"] == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="needs the teacher"):
        objectives.get("distill", cfg)
