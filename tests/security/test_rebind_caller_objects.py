"""Issue 22, point 4: a file decides nothing about the caller's objects.

Placeholder paths are checked against the rebuilt model and never written: load neither creates nor replaces an
attribute, so a forged path can neither rebind into the caller's env nor register the caller's expert a second time.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.env_util import make_vec_env

from _stfile import edit_manifest
from lang_dqn import CustomDQN, ModuleExpert, make_model
from sb3_safe_save import FormatError, audit, external, unwrap


@pytest.fixture(scope="module")
def expert_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, ModuleExpert]:
    expert = ModuleExpert(width=8)
    model = make_model(external(expert), net_arch=[8])
    path = tmp_path_factory.mktemp("rebind") / "agent.safetensors"
    model.save(path)
    return path, expert


@pytest.mark.parametrize("path", ["env.envs", "env.num_envs", "env.buf_rews", "replay_buffer.observations"])
def test_a_placeholder_outside_the_stored_modules_is_refused_before_anything_is_built(
    expert_file: tuple[pathlib.Path, ModuleExpert], path: str, tmp_path: pathlib.Path
) -> None:
    source, expert = expert_file

    def edit(m: dict[str, Any]) -> None:
        m["placeholders"].append({"key": "spy", "paths": [path], "type": "x.Y", "reason": "external", "optional": True})

    forged = tmp_path / "forged.safetensors"
    edit_manifest(source, forged, edit)
    env = make_vec_env("CartPole-v1", n_envs=1)
    envs, num_envs, buf_rews = env.envs, env.num_envs, env.buf_rews.copy()
    with pytest.raises(FormatError, match=rf"placeholder 'spy': cannot rebind at '{path}': it is outside the stored modules"):
        CustomDQN.load(forged, env=env, resources={"vlm_model": expert})
    assert env.envs is envs and len(env.envs) == 1 and env.num_envs == num_envs == 1
    assert np.array_equal(env.buf_rews, buf_rews)
    report = audit(forged, algo=CustomDQN, fail_on="warning")
    assert not report.ok and any(f.code == "refused_attribute" and path in f.paths for f in report.findings)


def test_an_extra_path_for_the_expert_never_registers_it(
    expert_file: tuple[pathlib.Path, ModuleExpert], tmp_path: pathlib.Path
) -> None:
    source, expert = expert_file
    before = {k: v.clone() for k, v in expert.state_dict().items()}

    def edit(m: dict[str, Any]) -> None:
        m["placeholders"][0]["paths"] += ["policy.q_net.helper", "policy.q_net_target.helper"]

    forged = tmp_path / "forged.safetensors"
    edit_manifest(source, forged, edit)
    with pytest.warns(UserWarning, match=r"'vlm_model' at policy\.q_net\.helper.*load never creates or replaces"):
        model = CustomDQN.load(forged, env=make_vec_env("CartPole-v1"), resources={"vlm_model": expert})
    for net in (model.policy.q_net, model.policy.q_net_target):
        assert "helper" not in net.__dict__ and "helper" not in net._modules
        assert all(m is not expert for m in net.modules())  # not registered anywhere
    assert unwrap(model.policy.q_net.vlm_model) is expert  # where the network's own code put it
    model.learn(120)  # target updates and gradient steps: no HazardError, and the expert is untouched
    assert all(th.equal(before[k], v) for k, v in expert.state_dict().items())
