"""Drive the TrainingMachine from Python: step by step, then to the end.

    python examples/train_api.py [CONFIG.yaml] [key=value ...]
"""

from __future__ import annotations

import sys

from stackwise.config import StackWiseConfig
from stackwise.training import TrainingMachine


def main(argv: list[str]) -> None:
    path = argv[0] if argv and "=" not in argv[0] else "examples/curriculum.yaml"
    overrides = [a for a in argv if "=" in a]
    config = StackWiseConfig.from_yaml(path).with_overrides(overrides)
    machine = TrainingMachine(config)
    # One step at a time: t, the step index and the active phase are always readable.
    for _ in range(3):
        out = machine.train_step()
        print(f"step {out['step']} t={out['t']:.3f} phase={out['phase']} loss={out['loss'].item():.3f} lr={out['lr']:.2e}")
    planes = machine.planes
    print("model:", planes.model.to_spec().rack.roles, "| batch:", planes.data.spec())
    result = machine.train()
    print(f"final validation: {result.final_val_loss:.3f} nats/token, {result.final_val_bpb:.3f} bits/byte")
    print("transitions:", [(tr.step, tr.from_phase, tr.to_phase) for tr in result.transitions])


if __name__ == "__main__":
    main(sys.argv[1:])
