"""Uptraining: continued pre-training of a converted model, on one process or many.

settings          TrainSettings: every option of `gqa-convert uptrain`, said once
accelerate_yaml   the user's Accelerate YAML, read and checked
plan              prepare(): everything resolved in one pass into a frozen TrainPlan
data              the token folders a run reads, and each process's batches
strategies/       ddp, fsdp2, deepspeed behind one Strategy protocol (a registry entry each)
losses            the chunked LM and distillation losses, and the modules that compute them
loop              the worker: Trainer, with train() -> train_step() -> forward_backward()
checkpoint/       checkpoint folders (no pickle), the resume contract, choosing and pruning
metrics           metrics.jsonl and the progress bar
export            the trained model, streamed out tensor by tensor
runtime           a worker's process group, lifetime and one-line errors
launch            uptrain(): the entry point; the workers launched, or a dry run
"""
