"""`orchestrator up --instances`: a stage that cannot start is not restarted forever."""

import logging

from shared.app import supervisor
from tests.support import stage_env


async def test_a_crash_looping_stage_makes_up_give_up_saying_why(
    nats_server, tmp_path, monkeypatch, caplog
):
    config = tmp_path / "pipeline.toml"
    missing = tmp_path / "missing.gguf"
    config.write_text(f'[stages.inference.options]\nworker = "local"\n'
                      f'local = {{ model_path = "{missing}" }}\n', encoding="utf-8")  # fmt: skip
    for key, value in stage_env(nats_server.url).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(supervisor, "RESTART_DELAY", 0.05)
    caplog.set_level(logging.WARNING, logger=supervisor.__name__)

    code = await supervisor.supervise(["inference", "post"], nats_server.url, config)

    assert code == 1
    restarted = [r for r in caplog.records if "restarting in" in r.getMessage()]
    assert [r.getMessage().split()[0] for r in restarted] == ["inference"] * 4
    [gave_up] = [r for r in caplog.records if "giving up" in r.getMessage()]
    assert gave_up.getMessage().startswith(f"inference exited {supervisor.GIVE_UP_AFTER} times")
    assert "(last with code 2)" in gave_up.getMessage()
