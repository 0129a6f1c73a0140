"""Batched sampling stages used by `engine.sampler.Sampler`.

`batch` turns a step's requests into per-row tensors, `penalties` edits logits (min_tokens,
repetition / presence / frequency penalties), `logprobs` reads log-probabilities, `truncation`
applies top-k / top-p / min-p, and `noise` draws the exponential noise the sampler races.
"""
