"""The MHR / Poly task router: a learned task-by-(head, skill) logit matrix Z, no dependence on the tokens."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

EPS = 1e-12  # keeps the per-head normalization finite if every sigmoid underflows


class TaskRouter(nn.Module):
    """Routing weights per sample from its task id.

    Poly (Ponti et al., EACL 2023) / MHR (Caccia et al., NeurIPS 2023), as in mttl's poly.py: z = Z[t] viewed as [n_splits, n_skills];
    zhat = sigmoid(z) in eval, a relaxed Bernoulli (Gumbel-sigmoid, temperature 1) sample in training when
    `relaxed_bernoulli`; w[h, s] = zhat[h, s] / sum_s zhat[h, s]. A normalized sum of sigmoids, not a softmax: equal
    logits give equal weights, and no skill ever gets exactly zero weight.
    """

    def __init__(self, n_tasks: int, n_splits: int, n_skills: int, relaxed_bernoulli: bool = True):
        super().__init__()
        self.n_splits, self.n_skills = n_splits, n_skills
        self.relaxed_bernoulli = relaxed_bernoulli
        self.task_logits = nn.Parameter(torch.empty(n_tasks, n_splits * n_skills))  # Z [n_tasks, H * S]
        self.reset_parameters()

    @property
    def n_tasks(self) -> int:
        return self.task_logits.shape[0]

    @torch.no_grad()
    def reset_parameters(self, rows: slice = slice(None)) -> None:
        nn.init.uniform_(self.task_logits[rows], -1e-3, 1e-3)  # near-uniform routing at the start (mttl, PEFT)

    def add_tasks(self, count: int) -> None:
        """Append `count` fresh rows (MHR-z fits a new task with a new row, skills frozen)."""
        old = self.task_logits.detach()
        new = torch.empty(count, old.shape[1], dtype=old.dtype, device=old.device)
        nn.init.uniform_(new, -1e-3, 1e-3)
        self.task_logits = nn.Parameter(torch.cat([old, new]), requires_grad=self.task_logits.requires_grad)

    def forward(self, task_ids: torch.Tensor) -> torch.Tensor:
        """task_ids [B] long -> weights [B, n_splits, n_skills] float32 (each head's weights sum to 1)."""
        z = self.task_logits.float()[task_ids.to(self.task_logits.device)]  # [B, H * S]
        z = z.view(-1, self.n_splits, self.n_skills)  # [B, H * S] -> [B, H, S]
        if self.training and self.relaxed_bernoulli:
            zhat = RelaxedBernoulli(temperature=torch.tensor(1.0, device=z.device), logits=z).rsample()  # [B, H, S]
        else:
            zhat = torch.sigmoid(z)  # [B, H, S]
        return zhat / (zhat.sum(dim=-1, keepdim=True) + EPS)  # [B, H, S]

    def eval_weights(self, task_id: int) -> torch.Tensor:
        """The deterministic (eval) weights of one task, [n_splits, n_skills]: what a task merge uses."""
        z = self.task_logits.float()[task_id].view(self.n_splits, self.n_skills)  # [H * S] -> [H, S]
        zhat = torch.sigmoid(z)
        return zhat / (zhat.sum(dim=-1, keepdim=True) + EPS)
