"""Layer-wise fine-tuning: the transfer-learning recipes (Yosinski et al. 2014, "How transferable
are features in deep neural networks?") applied at every experience after the first.

Each layer group is frozen, fine-tuned at ``lr_scale`` x the spec's learning rate, or re-initialised
and retrained at the full rate. Groups: ``backbone.<i>``, the i-th backbone module with weights of
its own (MLP: the i-th Linear), and ``head``. The first experience trains everything.
"""

from typing import Annotated, Literal

from pydantic import Field, StringConstraints
from torch import nn

from clgrid.strategies.base import Batch, Context, Strategy, StrategyConfig

GroupName = Annotated[str, StringConstraints(pattern=r"^(head|backbone\.\d+)$")]
Action = Literal["frozen", "finetune", "reinit"]


class FinetuneLayersConfig(StrategyConfig):
    name: Literal["finetune_layers"] = "finetune_layers"
    layers: dict[GroupName, Action] = Field(
        {"backbone.0": "frozen"}, description="layer group (head, backbone.<i>) -> frozen | finetune | reinit; "
                                              "groups not named are fine-tuned")
    lr_scale: float = Field(0.1, gt=0, description="multiplies the spec's learning rate of fine-tuned groups")


def layer_groups(model: nn.Module) -> dict[str, nn.Module]:
    """``backbone.<i>`` for each backbone module owning parameters directly, in order, then ``head``."""
    owners = [m for m in model.backbone.modules() if next(m.parameters(recurse=False), None) is not None]
    return {**{f"backbone.{i}": m for i, m in enumerate(owners)}, "head": model.head}


class FinetuneLayers(Strategy):
    Config = FinetuneLayersConfig
    needs_hidden_layers = "trains groups of the MLP's hidden layers"

    def __init__(self, config: FinetuneLayersConfig):
        super().__init__(config)
        self.frozen: list[nn.Module] = []

    def before_experience(self, ctx: Context) -> None:
        if ctx.experience_index == 0:
            return
        groups = layer_groups(ctx.model)
        unknown = sorted(set(self.config.layers) - set(groups))
        if unknown:
            raise ValueError(f"finetune_layers: no layer group {', '.join(unknown)}; this model has {', '.join(groups)}")
        param_groups, self.frozen = [], []
        for name, module in groups.items():
            action = self.config.layers.get(name, "finetune")
            module.requires_grad_(action != "frozen")
            if action == "frozen":
                self.frozen.append(module)
                continue
            if action == "reinit":
                for m in module.modules():  # draws from torch's global RNG: checkpointed, so resumable
                    if hasattr(m, "reset_parameters"):
                        m.reset_parameters()
            lr = ctx.lr * (self.config.lr_scale if action == "finetune" else 1.0)
            param_groups.append({"params": list(module.parameters()), "lr": lr})
        if not param_groups:
            raise ValueError("finetune_layers: every layer group is frozen, nothing would train")
        ctx.reset_optimizer(param_groups)

    def train_batch(self, batch: Batch, ctx: Context) -> Batch:
        for module in self.frozen:  # the trainer sets train mode; frozen batch-norm statistics must not move
            module.eval()
        return batch
