"""The torch.fx work: tracing, plans, the two passes, measuring damage, and folding."""
