"""The main job in one run: an agent with a live expert is saved, audited, and loaded back exactly.

1. Train a tiny DQN on CartPole whose Q-network adds an "LLM expert"'s log-probabilities to its
   Q-values. The expert refuses pickling, as vLLM's ``LLM`` does. The Q-network holds it through
   ``sb3_safe_save.external()``, so it is no submodule (SB3's target update could not zero it).
2. Show what stock SB3 does with it: ``save`` raises, after truncating the last good checkpoint.
3. Save with sb3_safe_save: the expert becomes a typed placeholder, the file holds no pickle.
4. Audit the file (header only) the way a CI job would.
5. Load it with the expert rebound (``resources=``) and show the agent is exact: same weights bit for
   bit, same optimizer state and counters, same actions with the expert off and on.

Run: ``make demo``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch as th
from stable_baselines3 import DQN

import sb3_safe_save as sss
from lang_dqn import CustomDQN, UnpicklableExpert, make_model


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="sb3_safe_save_demo_"))
    expert = UnpicklableExpert(name="stub-llm-7b")

    print("1. training a tiny DQN with an unpicklable expert in its Q-network ...")
    model = make_model(expert, net_arch=[64, 64])
    model.policy.set_use_expert(True)  # the article consults the expert while collecting
    model.learn(1000)
    model.policy.set_use_expert(False)
    held = model.policy.q_net.__dict__["vlm_model"]
    registered = "q_net.vlm_model" in dict(model.policy.named_modules())
    print(f"   q_net.vlm_model is {type(held).__name__}({type(sss.unwrap(held)).__name__}); a submodule: {registered}")

    print("\n2. stock SB3 save, over an existing checkpoint:")
    stock = work / "stock_best_model.zip"
    stock.write_bytes(b"PK\x03\x04 (pretend this is last night's good checkpoint)")
    try:
        DQN.save(model, stock)  # SB3's own save, bypassing the mixin
    except Exception as e:
        print(f"   SB3 raised {type(e).__name__}: {e}")
    print(f"   and the checkpoint at {stock.name} is now {stock.stat().st_size} bytes")

    print("\n3. sb3_safe_save:")
    path = work / "agent.safetensors"
    model.save(path)
    manifest = sss.read_manifest(path)
    print(f"   wrote {path.name}: {path.stat().st_size:,} bytes, format v{manifest.format_version}")
    for ph in manifest.placeholders:
        print(f"   placeholder {ph.key!r} ({ph.type}, {ph.reason}) at {', '.join(ph.paths)}")

    print("\n4. audit (reads the header only; decides as CustomDQN.load would):")
    report = sss.audit(path, max_bytes="1 MB", algo=CustomDQN)
    print("   " + report.table().replace("\n", "\n   "))
    print(f"   verdict: {report.summary()}")

    print("5. load with the expert rebound, and check it is the same agent:")
    loaded = CustomDQN.load(path, env=gym.make("CartPole-v1"), resources={"vlm_model": expert})
    # the Q-network holds the expert through external(): unwrap() gives back the very same object
    assert sss.unwrap(loaded.policy.q_net.vlm_model) is expert, "the expert is the very same object"
    for a, b in zip(model.policy.state_dict().values(), loaded.policy.state_dict().values(), strict=True):
        assert th.equal(a, b)
    opt_a, opt_b = model.policy.optimizer.state_dict()["state"], loaded.policy.optimizer.state_dict()["state"]
    assert all(th.equal(opt_a[i][k], opt_b[i][k]) for i in opt_a for k in opt_a[i])
    assert (model.num_timesteps, model.exploration_rate) == (loaded.num_timesteps, loaded.exploration_rate)
    obs = np.random.default_rng(0).normal(size=(256, 4)).astype(np.float32)
    for use_expert in (False, True):
        model.policy.set_use_expert(use_expert)
        loaded.policy.set_use_expert(use_expert)
        same = np.array_equal(model.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0])
        assert same
        print(f"   use_expert={use_expert!s:5}: 256/256 actions identical")
    print("   weights bitwise equal, optimizer state equal, counters equal, expert identity kept")
    loaded.learn(100)
    print("   learn() continues on the loaded agent")
    if os.environ.get("SB3_SAFE_SAVE_DEMO_KEEP"):
        print(f"\nOK: exact round trip. Files kept in {work}")
    else:
        for f in work.iterdir():
            f.unlink()
        work.rmdir()
        print("\nOK: exact round trip. (Set SB3_SAFE_SAVE_DEMO_KEEP=1 to keep the files.)")


if __name__ == "__main__":
    main()
