"""Planning an uptraining run before it runs, without the weights: the model's shape from its config
alone (built on the meta device), the memory each device needs under a strategy and world size, the
smallest change that makes a run fit, and the time and GPU-hours of the token budget.

    shapes       the model's parameters and dimensions, from config.json or a GGUF header
    activations  what a training step keeps for backward, per decoder layer, and its working set
    memory       the per-device memory of one training step under ddp, fsdp2 or deepspeed (ZeRO-3)
    hardware     GPUs: their memory and peak FLOP/s, the one detected, time from throughput
    advice       the smallest change of the settings that fits the memory
    run_plan     the whole plan from TrainSettings (what `uptrain --dry-run` prints)
"""
