"""Optional Weights & Biases logging (--wandb): used when installed, one sentence when it is not."""
import sys
import types

import pytest

from util.errors import UserError
from util.run_log import RunLogger, require_wandb


def test_logs_to_wandb_next_to_the_jsonl(tmp_path, monkeypatch):
    calls = []
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)),
                                 log=lambda values, step: calls.append(("log", values, step)),
                                 finish=lambda: calls.append(("finish",)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    logger = RunLogger(tmp_path, True, tensorboard=False, wandb_run={"project": "p", "name": "n", "config": {"a": 1}})
    logger.log(7, {"loss": 0.5})
    logger.close()
    assert calls[0] == ("init", {"dir": str(tmp_path), "project": "p", "name": "n", "config": {"a": 1}})
    assert calls[1] == ("log", {"train/loss": 0.5}, 7) and calls[2] == ("finish",)
    assert '"loss": 0.5' in (tmp_path / "log.txt").read_text()


def test_missing_package_is_one_sentence(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(UserError, match="pip install wandb"):
        require_wandb()


def test_trainer_refuses_wandb_before_any_work(monkeypatch, capsys, tmp_path):
    from generation.train import main

    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(SystemExit) as stopped:
        main(["--model", "DiT-S/2", "--data-path", str(tmp_path), "--wandb", "--device", "cpu"])
    assert stopped.value.code == 2 and "pip install wandb" in capsys.readouterr().err
