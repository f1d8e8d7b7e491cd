"""Finetuning, zero-shot and linear-probe evaluation (DESIGN §5-§6).

Modules, one line each:
  finetune.py       finetune_and_probe(): the stage function (inputs checked, epoch 0, epochs, best epoch, report)
  data.py           manifest datasets, eval ImageFolder, stratified train fractions, BatchPlan (MixData / MixLoss)
  model.py          ClipClassifier (image encoder + head from templates), layer counting, freeze / re-init
  loop.py           Trainer: AdamW, warmup + cosine, accumulation, autocast, grad clip; per-epoch seeding
  evaluate.py       features, flat metric dicts (zero-shot, head, linear probe), feature cache
  linear_probe.py   logistic regression, L2 swept on val (warm-started L-BFGS path), refit on train+val
  checkpoint.py     load_clip-compatible checkpoints with head and trainer state; architecture check
  plots.py          val accuracy per epoch; accuracy vs training images over runs (seed 004 Fig. 2)
  synthetic_world.py  coloured-shape ImageFolders and manifests for tests and the offline demo
  demo.py           demo_finetune(): the finetune step of `curate demo`
  cli.py            the `finetune-and-probe` click command (also `curate finetune-and-probe`)
"""
