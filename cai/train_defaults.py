"""The demo training's settings (``cai train`` makes a flag of each); importable without torch."""

DEFAULTS = {
    "epochs": 30,  # stage 1: everything but the Inception convs, on cached features
    "finetune_epochs": 1,  # stage 2: all trainable parameters, on images
    "batch_size": 128,
    "lr": 1e-3,
    "finetune_lr": 1e-4,
    "weight_decay": 1e-4,
    "warmup_epochs": 1,
    "val_fraction": 0.1,
    "huber_dz": 0.02,  # quadratic below |dz| = 0.02, linear above: robust to outliers
    "threads": 2,
}
