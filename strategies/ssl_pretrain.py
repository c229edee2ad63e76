"""Self-supervised pretraining on each experience (SimCLR: Chen et al. 2020), then supervised training.

Before the labels are used, the backbone learns from the experience's unlabelled inputs (and the
replay memory's, if any): two random views of every image (resized crop, translation, noise) are
pulled together and pushed from the batch's other views by the NT-Xent loss on a projection head.
The supervised phase then trains the head (and, by default, the backbone) through the normal loop,
with experience replay (strategies/replay.py) when ``buffer_size`` > 0.
"""

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from clgrid.strategies.base import Batch, Context
from clgrid.strategies.replay import Replay, ReplayConfig


class SSLPretrainConfig(ReplayConfig):
    name: Literal["ssl_pretrain"] = "ssl_pretrain"
    # Replay is optional here. Pydantic replaces an inherited field whole, so the default and its bound restate it.
    buffer_size: int = Field(0, ge=0, description="samples the replay memory holds; 0: no replay")
    ssl_epochs: int | None = Field(None, ge=1, description="contrastive epochs per experience; default: the spec's budget")
    ssl_batch_size: int | None = Field(None, ge=2, description="contrastive batch (negatives); default: the spec's")
    temperature: float = Field(0.5, gt=0)
    projection_dim: int = Field(64, ge=1)
    crop_scale: float = Field(0.7, gt=0, le=1, description="smallest crop side, as a fraction of the image side")
    max_shift: float = Field(0.1, ge=0, description="extra translation, as a fraction of the image side")
    noise_std: float = Field(0.1, ge=0, description="Gaussian noise added to each view")
    finetune_backbone: bool = Field(True, description="False: the supervised phase trains the head only")


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """Each view must pick its partner among the 2N - 1 other views (cosine similarity / temperature)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = len(z1)
    sim = (z @ z.T / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), -torch.inf)
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, partner)


def augment(x: Tensor, c: SSLPretrainConfig, rng: torch.Generator) -> Tensor:
    """A random view of every image: zoom into a crop of side in [crop_scale, 1], shift, add noise."""
    n = len(x)
    side = c.crop_scale + (1 - c.crop_scale) * torch.rand(n, generator=rng)
    shift = (1 - side + 2 * c.max_shift)[:, None] * (2 * torch.rand(n, 2, generator=rng) - 1)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = side
    theta[:, :, 2] = shift  # affine_grid coordinates span [-1, 1]: the image side is 2
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    noise = c.noise_std * torch.randn(x.shape, generator=rng).to(x.device)
    return (F.grid_sample(x, grid, align_corners=False) + noise).clamp(0, 1)


class SSLPretrain(Replay):
    Config = SSLPretrainConfig

    def __init__(self, config: SSLPretrainConfig):
        super().__init__(config)
        self.projector: nn.Module | None = None  # kept across experiences; discarded by the classifier

    def _build_projector(self, ctx: Context) -> nn.Module:
        width = ctx.model.backbone.out_features
        return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, self.config.projection_dim)).to(ctx.device)

    def contrastive_loss(self, batch: Batch, ctx: Context) -> Tensor:
        c = self.config
        views = [self.projector(ctx.model.features(augment(batch.x, c, ctx.rng))) for _ in range(2)]
        return nt_xent(*views, c.temperature)

    def before_experience(self, ctx: Context) -> None:
        c, exp = self.config, ctx.experience
        self.projector = self.projector or self._build_projector(ctx)
        x = torch.cat([exp.x, ctx.replay.rows()["x"]]) if len(ctx.replay) else exp.x
        zeros = torch.zeros(len(x), dtype=torch.long)  # labels are not used
        ctx.fit(x, zeros, zeros, epochs=c.ssl_epochs, batch_size=c.ssl_batch_size,
                loss_fn=lambda batch: self.contrastive_loss(batch, ctx),
                params=[*ctx.model.backbone.parameters(), *self.projector.parameters()])
        if not c.finetune_backbone:
            ctx.reset_optimizer(ctx.model.head.parameters())

    def state_dict(self) -> dict[str, Any]:
        return {"projector": self.projector.state_dict()} if self.projector else {}

    def load_state_dict(self, state: dict[str, Any], ctx: Context) -> None:
        if "projector" in state:
            self.projector = self._build_projector(ctx)
            self.projector.load_state_dict(state["projector"])
