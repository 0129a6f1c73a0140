"""Batched sampling stages used by `engine.sampler.Sampler`.

`batch` turns a step's requests into per-row tensors, `bias` adds logit_bias, `grammar_mask`
applies structured output's token bitmask (`grammar` is the xgrammar seam: checks, compiler,
per-request matcher state), `penalties` edits logits (min_tokens, repetition / presence /
frequency penalties), `logprobs` reads log-probabilities, `truncation` applies top-k / top-p /
min-p, and `noise` draws the exponential noise the sampler races.
"""
