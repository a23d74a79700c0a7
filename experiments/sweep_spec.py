"""What a sweep is (sweep.py's flags as a typed spec), validated before any trial starts; errors are
ConfigErrors naming the spec FIELD (`space`, `trials`, ...), which sweep.py maps to its flags."""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from common.errors import ConfigError
from experiments.space import Param, grid, parse_space

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "none")
# Flags of a trial the sweep sets itself.
RESERVED = {"--run_dir", "--resume", "--sweep_control"}


@dataclass
class SweepSpec:
    script: str
    space: str  # the --space text (experiments/space.py)
    metric: str  # e.g. dev_accuracy (experiments/runs.py lookup)
    out: str
    direction: str = "maximize"
    fixed: list[str] = field(default_factory=list)  # flags every trial gets
    trials: Optional[int] = None  # total finished trials wanted (default: the grid's size with grid)
    sampler: str = "tpe"
    seed: int = 0
    task: Optional[str] = None  # which task's epochs count when a run trains several
    pruner: str = "median"
    prune_startup_trials: int = 5  # median pruning starts once this many trials finished
    prune_warmup_epochs: int = 0  # and never before a trial's epoch warmup + 1
    parallel: int = 1
    devices: Optional[list[str]] = None  # per slot: a CUDA index (CUDA_VISIBLE_DEVICES) or "cpu"
    python: str = sys.executable

    def parsed_space(self) -> dict[str, Param]:
        return parse_space(self.space)

    def validate(self) -> None:
        space = self.parsed_space()
        if not Path(self.script).is_file():
            raise ConfigError("script", f"{self.script}: no such file")
        if self.direction not in ("maximize", "minimize"):
            raise ConfigError("direction", f"{self.direction!r}: use maximize or minimize")
        if self.sampler not in SAMPLERS:
            raise ConfigError("sampler", f"{self.sampler!r} is not one of {', '.join(SAMPLERS)}")
        if self.pruner not in PRUNERS:
            raise ConfigError("pruner", f"{self.pruner!r} is not one of {', '.join(PRUNERS)}")
        if self.sampler == "grid":
            grid(space)  # every parameter has a grid
        elif self.trials is None:
            raise ConfigError("trials", f"how many trials? (required with the {self.sampler} sampler)")
        if self.trials is not None and self.trials < 1:
            raise ConfigError("trials", f"must be >= 1, got {self.trials}")
        if self.parallel < 1:
            raise ConfigError("parallel", f"must be >= 1, got {self.parallel}")
        if self.devices is not None and len(self.devices) != self.parallel:
            raise ConfigError("devices", f"{len(self.devices)} device(s) for parallel {self.parallel}: give one per "
                              f"trial slot")
        for dev in self.devices or []:
            if dev != "cpu" and not dev.isdigit():
                raise ConfigError("devices", f"{dev!r}: a CUDA device index (0, 1, ...) or cpu")
        given = {f.split("=", 1)[0] for f in self.fixed if f.startswith("--")}
        clash = sorted(given & (RESERVED | {f"--{n}" for n in space}))
        if clash:
            raise ConfigError("fixed", f"{', '.join(clash)}: set by the sweep itself (run dirs, resumption) or a "
                              f"parameter of --space; drop it from the fixed flags")

    def signature(self) -> dict:
        """What a resumed sweep must share with the sweep it continues."""
        keep = ("script", "space", "metric", "direction", "fixed", "sampler", "seed", "task", "pruner",
                "prune_startup_trials", "prune_warmup_epochs")
        return {k: v for k, v in asdict(self).items() if k in keep}


def default_devices(parallel: int) -> Optional[list[str]]:
    """One CUDA device per slot (0..parallel-1); None (the environment as it is) for one slot."""
    if parallel == 1:
        return None
    import torch

    found = torch.cuda.device_count()
    if found < parallel:
        raise ConfigError("parallel", f"{parallel} trials at once need {parallel} CUDA devices, {found} found; "
                          f"give devices explicitly (cpu,cpu runs them side by side on the CPU)")
    return [str(i) for i in range(parallel)]
