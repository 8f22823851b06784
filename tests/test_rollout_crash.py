"""kill -9 in the middle of a promotion, and at random while a rollout's state is being written: the state
in the registry is always the old one or the new one, and a restart finishes what was cut short."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rollout_fakes import tiny_registry
from speciesclf import Registry
from speciesclf.rollout import PHASES, RegistryStore, Rollout, parse_rollout

TESTS = Path(__file__).parent

PROMOTE = textwrap.dedent("""
    import os, signal, sys
    from speciesclf import Registry
    from speciesclf.rollout import RegistryStore, Rollout, parse_rollout, controller

    root, point = sys.argv[1], sys.argv[2]
    controller._fault_points[point] = lambda: os.kill(os.getpid(), signal.SIGKILL)
    registry = Registry(root)
    rollout = Rollout(RegistryStore(registry, "m"), name="m", registry=registry)
    rollout.start("1.0.0", "1.1.0", parse_rollout("canary"))
    rollout.promote()
    print("not killed")
""")


def _run(script: str, *args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-c", script, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.parametrize("point, alias_after_crash", [("before-alias", "1.0.0"), ("after-alias", "1.1.0")])
def test_kill_9_mid_promotion_then_restart_finishes_it(tmp_path, point, alias_after_crash):
    registry = tiny_registry(tmp_path)
    proc = _run(PROMOTE, str(registry.root), point)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (out, err)
    state = json.loads((registry.root / "m" / "rollout.json").read_text())
    # Cut short: the state says a promotion is under way, and the alias is the old or the new version.
    assert state["phase"] == "promoting" and state["candidate"] == "1.1.0"
    assert registry.aliases("m")["production"] == alias_after_crash
    restarted = Rollout(RegistryStore(registry, "m"), name="m", registry=registry)
    restarted.recover()
    assert restarted.state["phase"] == "promoted"
    assert registry.aliases("m")["production"] == "1.1.0"
    assert [h["verdict"] for h in restarted.state["history"]] == ["start", "promote"]


CHURN = textwrap.dedent("""
    import sys
    from speciesclf import Registry
    from speciesclf.rollout import RegistryStore, Rollout, RolloutError, parse_rollout

    registry = Registry(sys.argv[1])
    rollout = Rollout(RegistryStore(registry, "m"), name="m", registry=registry)
    print("ready", flush=True)
    n = 0
    while True:
        n += 1
        try:
            rollout.start("1.0.0", "1.1.0", parse_rollout("canary", min_requests=1, min_seconds=0), replace=True)
            for _ in range(3):
                rollout.record_request("candidate", 5)
                rollout.record_gate("agreement", 5, 0)
                rollout.sync()
            (rollout.rollback if n % 2 else rollout.abort)("churn")
            registry.unreject("m", "1.1.0")
        except RolloutError:
            pass
""")


@pytest.mark.slow
def test_kill_9_at_random_while_the_state_is_written_never_leaves_a_mix(tmp_path):
    registry = tiny_registry(tmp_path)
    rng = random.Random(11)
    for _ in range(12):
        proc = _run(CHURN, str(registry.root))
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.02, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)  # also closes the pipes
        state = json.loads((registry.root / "m" / "rollout.json").read_text())  # always whole JSON
        assert state["phase"] in PHASES and state["candidate"] == "1.1.0"
        assert state["revision"] == len(state["history"]) or len(state["history"]) == 200
        if state["phase"] in ("running", "paused"):
            steps = state["policy"]["steps"]
            assert state["weight"] == steps[state["step"]] / 100  # weight and step written together
        Registry(registry.root).aliases("m")  # parses
        Rollout(RegistryStore(registry, "m"), name="m", registry=registry).recover()
    leftovers = [p.name for p in (registry.root / "m").iterdir() if p.name.endswith(".tmp")]
    # A writer killed between writing and renaming leaves its temporary file; the next writer removes it.
    Rollout(RegistryStore(registry, "m"), name="m", registry=registry).sync()
    assert not [p.name for p in (registry.root / "m").iterdir() if p.name.endswith(".tmp")], leftovers
