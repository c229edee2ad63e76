"""Deep Generative Replay (Shin et al. 2017, "Continual Learning with Deep Generative Replay").

A generator learns the inputs of every experience so far: after each experience it retrains on the
experience's data plus samples of its own previous copy. The solver trains on real batches plus
generated samples labelled (argmax) by the previous solver, so no real sample is ever stored.
The generator is a fully connected VAE on the flattened input; the paper's GAN is not implemented
(``generator`` offers "vae" only). A VAE needs more steps than the solver: ``generator_budget``.
"""

import copy
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from clgrid.strategies.base import Batch, Context, Strategy, StrategyConfig


class GenerativeReplayConfig(StrategyConfig):
    name: Literal["generative_replay"] = "generative_replay"
    generator: Literal["vae"] = Field("vae", description="the generator's kind (a GAN is not implemented)")
    generator_hidden: int = Field(400, ge=1, description="width of the VAE's two hidden layers")
    latent_dim: int = Field(32, ge=1)
    generator_budget: float = Field(
        5.0, gt=0, description="generator steps per experience, as a multiple of the solver's epochs or iterations")
    replay_ratio: float | None = Field(
        None, gt=0, description="generated samples per real one; default: as many as previous experiences, "
        "so every experience weighs the same (the paper's r = 1/N)")


class VAE(nn.Module):
    """Fully connected VAE with a Bernoulli decoder (inputs in [0, 1])."""

    def __init__(self, in_features: int, hidden: int, latent: int):
        super().__init__()
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(),
                                     nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                     nn.Linear(hidden, in_features))
        self.latent = latent

    def loss(self, x: Tensor) -> Tensor:
        """Negative ELBO per sample (summed over pixels, averaged over the batch)."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        recon = F.binary_cross_entropy_with_logits(self.decoder(z), x.flatten(1), reduction="sum")
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum()
        return (recon + kl) / len(x)

    @torch.no_grad()
    def sample(self, n: int, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        z = torch.randn(n, self.latent, generator=generator).to(next(self.parameters()).device)
        return torch.sigmoid(self.decoder(z)).view(n, *shape)


class GenerativeReplay(Strategy):
    Config = GenerativeReplayConfig

    def __init__(self, config: GenerativeReplayConfig):
        super().__init__(config)
        self.generator: VAE | None = None  # learns every experience so far; built after the first
        self.solver: nn.Module | None = None  # frozen copy of the model from before this experience

    def _build_generator(self, ctx: Context) -> VAE:
        c = self.config
        return VAE(math.prod(ctx.stream.input_shape), c.generator_hidden, c.latent_dim).to(ctx.device)

    def _n_replay(self, n_real: int, n_previous: int) -> int:
        return round(n_real * (self.config.replay_ratio or n_previous))

    def before_experience(self, ctx: Context) -> None:
        self.solver = copy.deepcopy(ctx.model).eval().requires_grad_(False) if self.generator else None

    def generate(self, n: int, ctx: Context) -> Batch:
        """``n`` generated inputs of random earlier experiences, labelled by the previous solver."""
        previous = ctx.seen[:-1]
        x = self.generator.sample(n, ctx.stream.input_shape, ctx.rng)
        t = torch.tensor([e.index for e in previous])[torch.randint(len(previous), (n,), generator=ctx.rng)]
        t = t.to(ctx.device)
        old = torch.zeros(ctx.stream.num_classes, dtype=torch.bool, device=ctx.device)
        old[[c for e in previous for c in e.classes]] = True
        with torch.no_grad():
            scores = ctx.mask(self.solver(x, t), t).masked_fill(~old, -torch.inf)  # only classes it learned
        return Batch(x, scores.argmax(1), t)

    def train_batch(self, batch: Batch, ctx: Context) -> Batch:
        if self.solver is None:
            return batch
        return batch.cat(self.generate(self._n_replay(len(batch), len(ctx.seen) - 1), ctx))

    def after_experience(self, ctx: Context) -> None:
        """Retrains the generator on this experience plus samples of its previous copy."""
        previous = copy.deepcopy(self.generator).eval() if self.generator else None
        self.generator = self.generator or self._build_generator(ctx)
        n_previous, shape = len(ctx.seen) - 1, ctx.stream.input_shape

        def loss_fn(batch: Batch) -> Tensor:
            x = batch.x
            if previous is not None:
                x = torch.cat([x, previous.sample(self._n_replay(len(x), n_previous), shape, ctx.rng)])
            return self.generator.loss(x)

        exp, scale = ctx.experience, self.config.generator_budget
        budget = {"epochs": math.ceil(ctx.epochs * scale)} if ctx.epochs else {"iterations": math.ceil(ctx.iterations * scale)}
        ctx.fit(exp.x, exp.y, torch.zeros_like(exp.y), loss_fn=loss_fn, params=self.generator.parameters(), **budget)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.state_dict()} if self.generator else {}

    def load_state_dict(self, state: dict[str, Any], ctx: Context) -> None:
        if "generator" in state:
            self.generator = self._build_generator(ctx)
            self.generator.load_state_dict(state["generator"])
