"""Real tasks with a program as the gold judge, for pretrained instruct models (the toy world's
counterpart at a real model's scale). See `rlhf.tasks.instructions`."""
