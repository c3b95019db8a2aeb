"""The built-in task, its judge, the demo and the arena.

``ReviewTask`` / ``judge``: a synthetic review-writing task with a programmatic reward.
``run_demo(DemoConfig())``: task -> tiny model -> SFT -> a method -> before/after evaluation.
``run_arena(ArenaConfig())``: every trainable method from the same SFT model, in one table.
"""

from dpokit.demo.task import ReviewTask, judge

__all__ = ["ReviewTask", "judge"]
