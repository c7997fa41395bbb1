"""Training: state.py (TrainState with the σ table), steps.py (train and eval steps),
loop.py (one loop over stages), interface.py and stages/ (the stages, one module each: the
base model, the σ-estimators and router nodes, fine-tuning), sigma_table.py (Insta-RS
Train's table), actions.py (what runs after each step and epoch)."""
