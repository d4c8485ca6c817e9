"""Evaluation: importance-sampled log-likelihood, posterior diagnostics, pictures, sweep reports."""
