"""Single-GPU InstructGPT RLHF: SFT -> reward model -> PPO / PPO-ptx over one shared 4-bit base.

Stages: `rlhf.sft.train`, `rlhf.reward.train`, `rlhf.ppo.train`, `rlhf.pipeline.run`,
`rlhf.eval.evaluate`; each takes its dataclass config (`SFTConfig`, `RMConfig`, ...).
Imported lazily so `import rlhf` stays cheap.

Progress lines go to the `rlhf` logger at INFO. Until the application configures logging (no handler
on the root logger) they are printed to stderr by a handler of our own, as transformers does for its
library logger, so the CLI and the Python API show the same lines; once it has, they reach its
handlers instead. `logging.getLogger("rlhf").setLevel(logging.WARNING)` silences them.
"""

from __future__ import annotations

import logging
import sys
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rlhf-lean")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _UntilConfiguredHandler(logging.StreamHandler):
    """stderr (as it is at each record, so captured streams work), while the root logger has no handler."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:  # the application configured logging: its handlers print this
            return
        self.stream = sys.stderr
        super().emit(record)


_logger = logging.getLogger("rlhf")
if not any(isinstance(h, _UntilConfiguredHandler) for h in _logger.handlers):
    _logger.addHandler(_UntilConfiguredHandler())
if _logger.level == logging.NOTSET:  # a level the application set first is kept
    _logger.setLevel(logging.INFO)
