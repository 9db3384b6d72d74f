"""Shared test fixtures: a tiny PEFT model with non-square LoRA modules, and local training steps."""

from __future__ import annotations

import torch
from peft import get_peft_model
from torch import nn

from peft_federated import FederatedLoraConfig

# d_out != d_in everywhere: a transposed residual cannot hide behind square layers.
IN, HIDDEN, OUT = 7, 5, 3
MODULES = ["up", "down"]


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(IN, HIDDEN)
        self.down = nn.Linear(HIDDEN, OUT)
        self.head = nn.Linear(OUT, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.down(torch.tanh(self.up(x)))))


def make_config(strategy: str, r: int = 3, **kw) -> FederatedLoraConfig:
    kw.setdefault("modules_to_save", ["head"])  # an extra trainable tensor, averaged by every strategy
    return FederatedLoraConfig(strategy=strategy, r=r, lora_alpha=2 * r, target_modules=MODULES, **kw)


def make_model(config: FederatedLoraConfig, dtype: torch.dtype = torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    return get_peft_model(TinyNet().to(dtype), config.to_lora_config())


def client_data(seed: int, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g, dtype=dtype)
    y = torch.randn(n, 2, generator=g, dtype=dtype)
    return x, y


def train_locally(client_round, x, y, steps: int = 3, lr: float = 0.1) -> None:
    """Real optimizer steps on the trainable parameters, with the strategy's regulariser."""
    model = client_round.model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        reg = client_round.regularizer()
        if reg is not None:
            loss = loss + reg.to(loss.dtype)
        loss.backward()
        opt.step()


def isolate_hub_client(monkeypatch, tmp_path, disable_xet: bool = False) -> None:
    """An online huggingface_hub client with HF_HOME in a temp dir and no ambient token or endpoint;
    xet left as installed (on) unless `disable_xet` (the plain-LFS upload path). The constants are
    patched too: huggingface_hub reads these variables once, at import."""
    from huggingface_hub import constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_HUB_DISABLE_XET"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    if disable_xet:
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", disable_xet)
