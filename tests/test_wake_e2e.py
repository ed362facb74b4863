"""The whole rhythm on the real default model, through the CLI as a person uses it: tell it
a fact in `reverie chat`, `/sleep`, restart, ask with retrieval off.

The test asserts that every stage ran (the turn was logged, the night consumed it and ran
its agents, the forge trained and its gate decided, the restarted chat answered on the
version the gate left active). Whether the fact came back is recorded, not asserted: the
recall figure belongs to the forge's report (README, "Memory formation")."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from conftest import REPO
from reverie.memory.daylog import DayLog
from reverie.memory.diary import list_nights, read_steps
from reverie.cli import app
from reverie.training.versions import Versions


@pytest.mark.e2e
def test_tell_sleep_restart_ask(tmp_path, model_cache, record_property):
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["data_dir"] = str(tmp_path / "data")
    config["models"]["cache_dir"] = str(model_cache)
    config["night"].update({"dream_bursts": 1, "reshape_rounds": 1, "max_notes": 2})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    data = tmp_path / "data"
    runner = CliRunner()

    day = runner.invoke(app, ["--config", str(path), "chat", "--user", "ana"],
                        input="Hi! My dog is called Biscuit.\n/sleep\n/quit\n")
    assert day.exit_code == 0, day.output + repr(day.exception)
    assert "slept" in day.output

    (session,) = DayLog(data / "days").sessions("ana")
    assert session.messages[0].content == "Hi! My dog is called Biscuit."
    assert DayLog(data / "days").unconsumed("ana") == []          # the night read it
    (night,) = list_nights(data / "diary")
    steps = read_steps(data / "diary" / night["night_id"] / "steps.jsonl")
    agents = {s.agent for s in steps}
    assert {"gather", "notetaker", "handoff", "forge"} <= agents
    forge = next(s for s in steps if s.agent == "forge")
    active = Versions(data / "models" / "versions").active()
    if forge.verdict.startswith("promoted"):
        assert active == forge.verdict.split()[-1] != "base"
    else:                                     # rolled back, or nothing was verified to learn
        assert active in (None, "base")

    ask = runner.invoke(app, ["--config", str(path), "chat", "--user", "ana", "--no-rag",
                              "--message", "What is my dog called?"])
    assert ask.exit_code == 0, ask.output + repr(ask.exception)
    answer = ask.output.strip()
    assert answer
    recalled = "biscuit" in answer.lower()
    record_property("forge", forge.verdict)
    record_property("recalled", recalled)
    print(f"\nforge: {forge.verdict}; closed-book answer: {answer!r}; recalled: {recalled}")
