"""Step 4 of a run: the tokenizer and the model (pretrained, from config, encoder-decoder), held to its position
limits, quantized where the device allows, wrapped with PEFT; adapters written and read back."""
