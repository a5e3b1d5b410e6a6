"""The runtime: `LowRankLinear`, the checkpoint format, model loading (whole or block by block),
the Triton kernels and their ops, and the Hugging Face and vLLM integrations. Imports nothing from
`lrinfer.evaluation` or `lrinfer.offline`."""
