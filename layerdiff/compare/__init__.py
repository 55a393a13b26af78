"""Two checkpoints compared tensor by tensor (base vs fine-tune): matching, streaming, results."""
