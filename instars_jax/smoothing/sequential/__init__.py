"""Sequential CERTIFY: rules.py (each stopping rule's statistics, settings and metadata) and
engine.py (the compiled continuous-batching loop that runs any of them); docs/sequential.md
has the proofs."""
