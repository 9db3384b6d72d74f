"""The local folder store: Hub layout on disk, atomic publishing, safe client ids (the contract both
stores keep, verified updates included, is in test_hub_store.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import make_config, make_model
from peft import PeftModel

from peft_federated import get_strategy
from peft_federated.aggregator import initialize
from peft_federated.hub_integration import LocalStore, check_client_id


@pytest.fixture
def fed(tmp_path):
    cfg = make_config("fedit", r=2)
    store = LocalStore(tmp_path / "store")
    model = make_model(cfg)
    initialize(store, cfg, model)
    return cfg, store, model


def payload(cfg, store, model, client, seed):
    state, _ = store.read_round()
    g = torch.Generator().manual_seed(seed)
    cr = get_strategy(cfg).prepare_client(model, state, client)
    return {k: torch.randn(v.shape, generator=g) for k, v in cr.payload().items()}


def test_round_zero_is_a_plain_peft_folder(fed):
    from helpers import TinyNet

    cfg, store, _ = fed
    assert store.latest_round() == 0
    PeftModel.from_pretrained(TinyNet(), store.round_path(0))
    assert (store.round_path(0) / "README.md").read_text().startswith("---\nlibrary_name: peft")


@pytest.mark.parametrize("bad", ["../evil", "a/b", "a\\b", "", ".hidden", "x" * 97, "a..b", None])
def test_client_ids_with_path_characters_are_refused(fed, bad):
    cfg, store, model = fed
    with pytest.raises(ValueError, match="Invalid client id"):
        check_client_id(bad)
    if isinstance(bad, str):
        with pytest.raises(ValueError, match="Invalid client id"):
            store.submit_update(0, bad, {"x": torch.zeros(1)}, {"num_samples": 1, "base_round": 0})
    assert list((store.root / "updates").iterdir()) == []
