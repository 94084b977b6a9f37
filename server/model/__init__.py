"""The model: checkpoint files, the tokenizer, the hardware profiles, the one-time conversion, CPU quantized
kernels, loading, and the export to a standard transformers folder. torch lives here and in engine/."""
