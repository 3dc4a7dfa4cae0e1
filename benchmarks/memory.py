"""Peak memory of one load (and then one save) in a fresh interpreter: ``python -m benchmarks.memory SPEC_JSON``.

VmHWM (peak resident set) is read from ``/proc/self/status``. ``bare`` is the peak after importing torch,
SB3, safetensors and this library (and building the expert, for the DQN cases): the interpreter before
the load. Raw loads (``st``, ``torch``) need a model to load into; it is built with this library's load
first, then the peak is reset (``/proc/self/clear_refs``) before the measured load. The save peak is
measured the same way after a reset, on the model just loaded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    import torch as th  # noqa: F401
    from stable_baselines3.common.base_class import BaseAlgorithm

    import sb3_safe_save  # noqa: F401
    from benchmarks.cases import model_class
    from benchmarks.methods import file_for, flat_tensors, load_fn, save_fn
    from benchmarks.models import make_expert

    method, stem = spec["method"], Path(spec["stem"])
    cls = model_class(spec["case"])
    expert = make_expert(spec["expert"]) if spec.get("expert") else None
    bare = _status("VmHWM")
    import torch._dynamo  # noqa: F401  (torch imports it, and sympy, on the first optimizer built: every SB3 build pays it)

    bare_dynamo = _status("VmHWM")
    if method in ("sb3", "ours"):
        model: BaseAlgorithm = load_fn(method, cls, file_for(method, stem), expert)()
    else:
        model = load_fn("ours", cls, file_for("ours", stem), expert)()
        _reset_peak()
        load_fn(method, cls, file_for(method, stem), expert, model)()
    peak_load = _status("VmHWM")
    model_bytes = sum(t.numel() * t.element_size() for t in flat_tensors(model).values())
    _reset_peak()
    before_save = _status("VmRSS")
    out = stem.with_name(stem.name + ".memsave")
    save_fn(method, model, flat_tensors(model), file_for(method, out))()
    peak_save = _status("VmHWM")
    file_for(method, out).unlink(missing_ok=True)
    return {
        "bare": bare,
        "bare_with_dynamo": bare_dynamo,
        "peak_load": peak_load,
        "model_bytes": model_bytes,
        "before_save": before_save,
        "peak_save": peak_save,
    }


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    print(json.dumps(measure(json.loads(sys.argv[1]))))
