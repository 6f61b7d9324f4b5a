"""One module per benchmarked op: its shapes, input builder, FLOP count and PyTorch peers."""
