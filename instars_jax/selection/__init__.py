"""The selector as a model, below training and certification (imported by both, importing
neither): estimator.py (the σ-estimator and the router's nodes: their saved settings,
loading them, majority bins), experts.py (σ experts: checking and loading them),
classifier.py (a run's classifier, x -> logits, from its checkpoint's variables alone)."""
