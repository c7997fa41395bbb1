"""Training: state.py (TrainState with the σ table), steps.py (train and eval steps),
loop.py (one loop over stages), stages.py and estimator.py (the stages), sigma_table.py
(Insta-RS Train's table), actions.py (what runs after each step and epoch)."""
