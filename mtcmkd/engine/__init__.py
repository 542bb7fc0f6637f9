"""Training: building a run apart from running it, in the shape of torchtitan's `train.py`.

Read in this order:

- `trainer`: `train()` (the loop, one screen) around `train_step` (one micro-batch);
- `build`: `build_run` -> `TrainRun` (checks, seeds, data, method, DeepSpeed engine, resume);
- `meter`: `Meter` (phase timers, loss-term means, samples/s) and `RunLog` (log.jsonl,
  TensorBoard, the console line);
- `checkpointer`: `Checkpointer` (when and what a run saves; student files; preemption);
- `validation`: `Validator` (held-out Dice, best student, plateau rule);
- `state`: `LoopState`, what a checkpoint holds besides weights, optimiser and RNG;
- `run_folder`: the run folder's files and the checks that it belongs to this run;
- `memory`: the memory estimate checked before training;
- `checkpoint`: the checkpoint format (complete-only, digests, weights-only loads);
- `dist`: ranks for every launcher and the device-aware `all_reduce`;
- `errors`: `TrainError` and the preemption exit code.

Nothing is imported here, so `mtcmkd.engine.checkpoint` (used by student files and exports)
loads without the loop's modules.
"""
