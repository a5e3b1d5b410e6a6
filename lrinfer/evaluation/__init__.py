"""Evaluation: perplexity, zero-shot tasks, chat, generation, decode benchmarks and plots.
Built on `lrinfer.runtime`; imports nothing from `lrinfer.offline`."""
