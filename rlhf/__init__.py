"""Single-GPU InstructGPT RLHF: SFT -> reward model -> PPO / PPO-ptx over one shared 4-bit base.

Stages: `rlhf.sft.train`, `rlhf.reward.train`, `rlhf.ppo.train`, `rlhf.pipeline.run`,
`rlhf.eval.evaluate`; each takes its dataclass config (`SFTConfig`, `RMConfig`, ...).
Imported lazily so `import rlhf` stays cheap.
"""

__version__ = "0.1.0"
